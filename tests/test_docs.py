"""The documentation runs: every fenced `python` block and every shell command of README.md and docs/*.md, in order
per file, in a temporary directory.

A comment on the line before a block says how it runs (invisible when the Markdown is rendered):
  <!-- doctest: skip: REASON -->   needs what no test machine has (a downloaded file, a cluster): skipped with REASON
  <!-- doctest: given: CODE -->    a fragment: CODE (one line of Python) runs first in the file's namespace
Python blocks are the fast tier. Shell blocks train, so they are the slow tier: `python launch.py` commands run as
written, except that an experiment named in full runs its `:local` variant for 4 steps, in the full experiment's run
directory (so the commands after it find the runs the text names); `tensorboard --logdir DIR` starts the viewer and
reads its run list; the install and the test suite itself are not rerun. What is not run is reported, with why, in
pytest's warnings summary.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
import types
import urllib.request
import warnings
from pathlib import Path

import pytest

from conftest import ROOT, launch_module

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_MARKER = re.compile(r"<!--\s*doctest:\s*(skip|given):\s*(.*?)\s*-->")


class DocBlockNotRun(UserWarning):
    """A block or command of the documentation that the test does not run, and why (shown in pytest's summary)."""


_NOT_RERUN = {  # command prefix -> why the docs test does not run it again
    "python -m pip install": "the install: CI runs the README's install command in a fresh venv",
    "python -m pytest": "the test suite itself",
}


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None = None
    given: str | None = None

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the doctest marker of the line before each."""
    found, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.search(before)
        body = textwrap.dedent("\n".join(lines[i + 1:end]))  # a fence inside a list item is indented
        block = Block(path, i + 1, fence.group(2), body + "\n")
        if marker:
            setattr(block, marker.group(1), marker.group(2))
        found.append(block)
        i = end + 1
    return found


def runnable(path: Path, lang: str):
    """The `lang` blocks of `path` in order, less those marked skip, each of which is reported with its reason."""
    for block in blocks(path):
        if block.lang == lang and block.skip:
            warnings.warn(f"skipped {block.where()}: {block.skip}", DocBlockNotRun)
        elif block.lang == lang:
            yield block


def commands(block: Block) -> list[str]:
    """A shell block's commands: continuation lines joined, comments dropped, `a && b` split."""
    joined = re.sub(r"\\\n\s*", " ", block.text)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out += [part.strip() for part in line.split("&&")]
    return out


def _ids(kind: str) -> list:
    return [pytest.param(path, id=path.name) for path in DOCS if any(b.lang == kind for b in blocks(path))]


def test_the_markers_are_read_and_every_block_has_a_language():
    """Guards the collection itself: an unlabelled fence or a misspelt marker would silently run nothing."""
    all_blocks = [b for path in DOCS for b in blocks(path)]
    assert len([b for b in all_blocks if b.lang == "python"]) >= 5 and len(all_blocks) >= 12
    unlabelled = [b.where() for b in all_blocks if b.lang not in ("python", "bash")]
    assert not unlabelled, f"fences without python/bash: {unlabelled}"
    for path in DOCS:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "doctest" in line and line.lstrip().startswith("<!--"):
                assert _MARKER.search(line), f"{path.name}:{n}: unreadable doctest marker {line!r}"
    assert all(b.skip for b in all_blocks if b.skip is not None), "a skip marker without its reason"


# --- python blocks: the fast tier ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", _ids("python"))
def test_python_blocks_run_in_order(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"gconv_doc_{path.stem}")  # a real module: Flax looks classes' modules up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for block in runnable(path, "python"):
        if block.given:
            exec(compile(block.given, f"{block.where()} (given)", "exec"), namespace)
        try:
            exec(compile(block.text, block.where(), "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the python block at {block.where()} fails: {type(e).__name__}: {e}") from e


# --- shell commands: the slow tier ---------------------------------------------------------------------------------

def _local(argv: list[str]) -> list[str]:
    """A training command of a full experiment as its `:local` variant for 4 steps, in the full experiment's run
    directory."""
    argv = list(argv)
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv:
        spec = argv[argv.index("--config") + 1]
    given = spec or "experiments/default.py"
    path, _, variant = given.partition(":")
    extra = []
    if not variant:
        name = os.path.splitext(os.path.basename(path))[0]
        if "--workdir" not in argv and not any(a.startswith("--workdir=") for a in argv):
            extra += ["--workdir", os.path.join("runs", name)]
        if spec is None:
            argv += ["--config", f"{path}:local"]
        else:
            argv = [f"{path}:local" if a == spec else (f"--config={path}:local" if a == f"--config={spec}" else a)
                    for a in argv]
    return argv + extra + ["--config.num_steps=4"]


def _launch(argv: list[str], log) -> int:
    """`launch.py argv` in this process (the current directory is the document's temporary directory)."""
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return launch_module().run(argv)


def _tensorboard(argv: list[str], tmp_path: Path) -> None:
    """Starts the viewer on a free port, waits until it serves, and checks that it lists runs."""
    out = tmp_path / "tensorboard.log"
    exe = Path(sys.executable).parent / "tensorboard"
    with open(out, "w") as f:
        proc = subprocess.Popen([str(exe), *argv, "--port", "0", "--bind_all"], stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (url := re.search(r"(http://\S+?:\d+)/", out.read_text())):
            assert proc.poll() is None, f"tensorboard {' '.join(argv)} ended:\n{out.read_text()}"
            assert time.time() < deadline, f"tensorboard served nothing within 120 s:\n{out.read_text()}"
            time.sleep(0.2)
        host, port = url.group(1).rsplit(":", 1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=30) as response:
            runs = json.loads(response.read())
        assert runs, f"tensorboard {' '.join(argv)} lists no runs"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("path", _ids("bash"))
def test_shell_commands_run_in_order(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    for block in runnable(path, "bash"):
        for command in commands(block):
            reason = next((why for prefix, why in _NOT_RERUN.items() if command.startswith(prefix)), None)
            if reason:
                warnings.warn(f"{block.where()}: not rerun {command!r}: {reason}", DocBlockNotRun)
                continue
            argv = shlex.split(command)
            if argv[0] == "tensorboard":
                _tensorboard(argv[1:], tmp_path)
                continue
            assert argv[:2] == ["python", "launch.py"], (
                f"{block.where()}: the docs test does not know how to run {command!r}: mark the block "
                f"<!-- doctest: skip: REASON --> or teach tests/test_docs.py")
            args = argv[2:]
            if not args or args[0].startswith("--"):  # training: the local variant of the experiment named
                args = _local(args)
            log, start = io.StringIO(), time.time()
            code = _launch(args, log)
            assert code == 0, f"{block.where()}: `{command}` (run as launch.py {' '.join(args)}) exited {code}:\n" \
                              f"{log.getvalue()[-4000:]}"
            print(f"ran {command!r} in {time.time() - start:.0f} s")

