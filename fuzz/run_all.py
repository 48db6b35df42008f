"""The long fuzzing run: every harness for a while, two at a time, on a copy of the committed corpus.

    python fuzz/run_all.py --seconds 600            # 10 minutes per harness
    python fuzz/run_all.py --seconds 600 --update   # then merge what was found into fuzz/corpus/

Prints one line per harness (executions, corpus, new coverage units, known-bug hits, crashes) and a
JSON summary; crash inputs are kept in the work directory (printed) as ``crash-*``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESSES = ("api", "cms", "smime", "ber", "x509", "base64")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=300)
    ap.add_argument("--only", default=",".join(HARNESSES))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--update", action="store_true", help="merge new inputs into fuzz/corpus/")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="tokenbridge-fuzz-"))
    names = [n for n in a.only.split(",") if n]
    pending, running, results = list(names), [], {}
    while pending or running:
        while pending and len(running) < a.jobs:
            name = pending.pop(0)
            d = work / name
            corpus = d / "corpus" / name
            if (HERE / "corpus" / name).is_dir():
                shutil.copytree(HERE / "corpus" / name, corpus, dirs_exist_ok=True)
            corpus.mkdir(parents=True, exist_ok=True)
            if (HERE / "corpus" / "pki.pem").exists():
                shutil.copy(HERE / "corpus" / "pki.pem", d / "corpus" / "pki.pem")
            log = d / "fuzz.log"
            env = {**os.environ, "FUZZ_KNOWN_FILE": str(d / "known.json")}
            p = subprocess.Popen([sys.executable, str(HERE / f"fuzz_{name}.py"), f"-max_total_time={a.seconds}",
                                  "-timeout=30", "-rss_limit_mb=3072", "-print_final_stats=1",
                                  f"-artifact_prefix={d}/", str(corpus)], cwd=d, stdout=log.open("w"),
                                 stderr=subprocess.STDOUT, env=env)
            running.append((name, p, d, len(list(corpus.iterdir()))))
        time.sleep(1)
        for item in list(running):
            name, p, d, start_corpus = item
            if p.poll() is None:
                continue
            running.remove(item)
            text = (d / "fuzz.log").read_text(errors="replace")
            execs = re.search(r"stat::number_of_executed_units: (\d+)", text)
            known = json.loads((d / "known.json").read_text()) if (d / "known.json").exists() else {}
            results[name] = {"exit": p.returncode, "executions": int(execs.group(1)) if execs else None,
                             "corpus_before": start_corpus,
                             "corpus_after": len(list((d / "corpus" / name).iterdir())),
                             "crashes": sorted(str(c) for c in d.glob("crash-*")), "known_bug_hits": known}
            print(f"{name:7s} exit {p.returncode:3d}  {results[name]['executions']} executions  corpus "
                  f"{start_corpus} -> {results[name]['corpus_after']}  known {sum(known.values())}  crashes "
                  f"{len(results[name]['crashes'])}", flush=True)
            if a.update:
                subprocess.run([sys.executable, str(HERE / f"fuzz_{name}.py"), "-merge=1", str(HERE / "corpus" / name),
                                str(d / "corpus" / name)], cwd=d, capture_output=True)
    print(json.dumps({"work": str(work), "seconds_each": a.seconds, "results": results}, indent=1))
    return 0 if all(r["exit"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
