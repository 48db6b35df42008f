"""A few seconds of each atheris harness in fuzz/ (the long runs: see fuzz/README.md).

Each harness runs in its own process on a copy of its committed corpus (fuzz/corpus/<name>/, so the
corpus is replayed too: every input that ever found new coverage is re-run), two at a time.
A finding makes libFuzzer exit non-zero and write the input; the test fails with its traceback.

The inputs libFuzzer wrote (crash-*, timeout-*, oom-*, leak-*, slow-unit-*) and the harness's log are
copied to ``$TOKENBRIDGE_FUZZ_ARTIFACTS/<harness>/`` (default: fuzz/artifacts/ in the checkout, which
.ci/run collects from the Debian roots), so that a finding made in a throw-away root or a CI run can be
replayed: ``python fuzz/fuzz_<harness>.py <file>``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FUZZ = REPO / "fuzz"
HARNESSES = {"api": 6, "cms": 4, "smime": 4, "ber": 4, "x509": 3, "base64": 2}  # name: seconds
ARTIFACTS = ("crash-*", "timeout-*", "oom-*", "leak-*", "slow-unit-*")  # what libFuzzer writes

pytest.importorskip("atheris", reason="atheris is not installed (pip install -e '.[fuzz]')")


def artifacts_dir() -> Path:
    return Path(os.environ.get("TOKENBRIDGE_FUZZ_ARTIFACTS") or FUZZ / "artifacts")


def keep_artifacts(name: str, work: Path, failed: bool) -> Path | None:
    """Copy what libFuzzer wrote for harness ``name``, and its log, out of the temporary directory."""
    found = sorted(f for pattern in ARTIFACTS for f in work.glob(pattern))
    if not found and not failed:
        return None
    dest = artifacts_dir() / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in [*found, work / "fuzz.log"]:
        shutil.copy(f, dest / f.name)
    return dest


def _start(name: str, seconds: int, tmp: Path) -> tuple[subprocess.Popen[str], Path]:
    corpus_src = FUZZ / "corpus" / name
    work = tmp / name
    work.mkdir()
    corpus = work / "corpus" / name
    if corpus_src.is_dir():
        shutil.copytree(corpus_src, corpus)
    else:
        corpus.mkdir(parents=True)
    pki = FUZZ / "corpus" / "pki.pem"
    if pki.exists():
        shutil.copy(pki, work / "corpus" / "pki.pem")
    log = work / "fuzz.log"
    proc = subprocess.Popen(
        [sys.executable, str(FUZZ / f"fuzz_{name}.py"), f"-max_total_time={seconds}", "-timeout=20",
         "-rss_limit_mb=3072", "-seed=1", f"-artifact_prefix={work}/", "-print_final_stats=1", str(corpus)],
        cwd=work, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"})
    return proc, log


def test_fuzz_harnesses_short_run(tmp_path: Path) -> None:
    pending = list(HARNESSES.items())
    running: list[tuple[str, subprocess.Popen[str], Path]] = []
    results: dict[str, tuple[int, int, str]] = {}
    while pending or running:
        while pending and len(running) < 2:
            name, seconds = pending.pop(0)
            proc, log = _start(name, seconds, tmp_path)
            running.append((name, proc, log))
        time.sleep(0.2)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            text = log.read_text(errors="replace")
            m = re.search(r"stat::number_of_executed_units: (\d+)", text) or re.search(r"Done (\d+) runs", text)
            kept = keep_artifacts(name, log.parent, proc.returncode != 0)
            if kept is not None:
                text += f"\n[inputs and log kept in {kept}; replay: python fuzz/fuzz_{name}.py <file>]"
            results[name] = (proc.returncode, int(m.group(1)) if m else 0, text)
    failures = {n: t[-4000:] for n, (rc, _, t) in results.items() if rc != 0}
    assert not failures, "fuzzing found a crash:\n" + "\n\n".join(f"== {n}\n{t}" for n, t in failures.items())
    for name, (_, runs, _text) in results.items():
        assert runs > 10, f"{name}: only {runs} executions"
    print({n: r for n, (_, r, _) in results.items()})
