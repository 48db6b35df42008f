"""The commands in the docs work as written (issue 17): the quickstart and the French administrator's guide.

Every ``sh`` block of those pages is run, in order, in one bash session against a demo hub started by the
quickstart's own first block (``bash scripts/bootstrap.sh serve``), with ``set -euo pipefail``: a command
that fails, or an ``openssl ... -verify`` that does not verify, fails the test and names its block. A
block that cannot run here (a real card, the production paths under /etc, another machine) carries
``<!-- ci: skip (why) -->`` just above it; the block that starts the service carries
``<!-- ci: background (why) -->``. Only two things are adapted: the port (a free one instead of 8155, in
case a real hub runs here) and the placeholder secret ``tb_...``, replaced by the one the start printed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, free_port

# The quickstart, then the French guide in its reading order: the blocks run one after another, as an
# administrator would type them (the guide's later pages use what its installation page set up).
PAGES = ["docs/quickstart.md", *(f"docs/fr/{name}.md" for name in (
    "README", "installation", "carte", "partage", "messagerie", "services-web", "exploitation"))]
# Any other page of the French guide must be added to PAGES, or have all its blocks marked (the check below).
MARKED = [*PAGES, *(str(p.relative_to(REPO)) for p in sorted((REPO / "docs" / "fr").glob("*.md")))]
MARK = re.compile(r"^<!--\s*ci:\s*(skip|background)\s*(?:\((?P<reason>[^)]*)\))?\s*-->\s*$")


@dataclass
class Block:
    page: str
    line: int
    text: str
    mark: str | None  # "skip", "background" or None (run)
    reason: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def shell_blocks(page: str) -> list[Block]:
    lines = (REPO / page).read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() in ("```sh", "```bash"):
            start = i
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            mark = MARK.match(before.strip())
            blocks.append(Block(page, start + 1, "\n".join(lines[start + 1:j]),
                                mark.group(1) if mark else None, (mark.group("reason") or "").strip() if mark else ""))
            i = j
        i += 1
    return blocks


@pytest.mark.parametrize("page", sorted(set(MARKED)))
def test_every_block_is_run_or_says_why_not(page: str) -> None:
    for block in shell_blocks(page):
        if block.mark is not None:
            assert block.reason, f"{block.where}: a ci: {block.mark} mark needs its reason in parentheses"
        elif page not in PAGES:
            pytest.fail(f"{block.where}: this page's blocks are not run by the tests: mark the block "
                        "`<!-- ci: skip (why) -->`, or add the page to PAGES in tests/test_doc_commands.py")


def _start(block: Block, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    process = subprocess.Popen(["bash", "-c", block.text], cwd=REPO, env=env, stdout=log.open("wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    port = env["TOKENBRIDGE_SERVER__PORT"]
    deadline = time.monotonic() + 120  # the first start creates the demo token
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{block.where} exited:\n{log.read_text(errors='replace')}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/ready", timeout=2).status_code == 200:
                secret = re.search(r"API key \(client \"quickstart\", shown once\):\s*(tb_\S+)", log.read_text())
                assert secret, log.read_text()
                return process, secret.group(1)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{block.where}: the service was not ready:\n{log.read_text(errors='replace')}")


def test_the_documented_commands_work_against_a_demo_hub(tmp_path: Path) -> None:
    port = free_port()
    venv = Path(sys.prefix)  # the virtualenv running the tests: .venv, or TOKENBRIDGE_VENV's
    env = {**os.environ, "TOKENBRIDGE_DEMO_DIR": str(tmp_path / "demo"), "TOKENBRIDGE_SERVER__PORT": str(port),
           "TOKENBRIDGE_VENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "HOME": str(tmp_path)}
    for name in ("TOKENBRIDGE_CONFIG", "TOKENBRIDGE_DATA_DIR", "TOKENBRIDGE_SERVICE_URL"):
        env.pop(name, None)
    blocks = [b for page in PAGES for b in shell_blocks(page)]
    background = [b for b in blocks if b.mark == "background"]
    assert len(background) == 1, "one block starts the demo hub"
    work = tmp_path / "work"  # where the commands write their files; `.venv/bin/...` as from a checkout
    work.mkdir()
    (work / ".venv").symlink_to(venv)
    process, secret = _start(background[0], env, tmp_path / "serve.log")
    try:
        script = ["set -euo pipefail"]
        for block in blocks:
            if block.mark is not None:
                continue
            text = block.text.replace("127.0.0.1:8155", f"127.0.0.1:{port}").replace("=tb_...", f"={secret}")
            script += [f"printf '\\n>>> %s\\n' '{block.where}'", text]  # on a line of its own
        result = subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env=env, capture_output=True,
                                text=True, timeout=600)
        ran = re.findall(r"^>>> (\S+)$", result.stdout, re.MULTILINE)
        assert result.returncode == 0, (f"the block at {ran[-1] if ran else '?'} failed:\n{result.stdout[-4000:]}\n"
                                        f"{result.stderr[-4000:]}")
        assert len(ran) == sum(1 for b in blocks if b.mark is None)
        # What the pages say the commands print.
        assert result.stdout.count("Verified OK") == 4, result.stdout  # the quickstart's four signatures
        assert "secret du jour" in result.stdout  # its decryption
        assert "audit log intact" in result.stdout
        assert re.search(r"^0 error\(s\)", result.stdout, re.MULTILINE), result.stdout  # `doctor`, in the guide
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
