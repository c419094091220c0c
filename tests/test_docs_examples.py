"""Every Python block of README.md and docs/*.md runs, verbatim, on its own.

A block that cannot run alone (it needs network namespaces, a peer, or stands for the
reader's own program) carries a visible marker on the line before it:

    <!-- not run: needs the namespaces of a lab -->

Those are counted, not skipped silently: the inventory test names each one with its
reason, and a block without a marker is run in a fresh interpreter, from a scratch
directory, with this checkout's `src` first on the path.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_MARKER = re.compile(r"^<!--\s*not run:\s*(?P<why>.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    where: str  # file:line of the opening fence
    code: str
    not_run: str | None  # the marker's reason


def python_blocks(path: pathlib.Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() in ("```python", "```py", "```python3"):
            start = i
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            before = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
            marker = _MARKER.match(before)
            blocks.append(
                Block(
                    f"{path.relative_to(ROOT)}:{start + 1}",
                    "\n".join(lines[start + 1 : end]) + "\n",
                    marker["why"] if marker else None,
                )
            )
            i = end
        i += 1
    return blocks


ALL = [block for path in DOCS for block in python_blocks(path)]
RUN = [block for block in ALL if block.not_run is None]


# Blocks marked "not run", per file: a new marker means a new line here, in review.
NOT_RUN = {"docs/lab.md": 6, "docs/pm.md": 4, "docs/run.md": 1}


def test_inventory() -> None:
    """Each block is run or says why not; the blocks not run are counted here."""
    not_run = [block for block in ALL if block.not_run is not None]
    for block in not_run:
        assert len(block.not_run or "") >= 10, f"{block.where}: say why it is not run"
    print(f"{len(ALL)} Python blocks: {len(RUN)} run, {len(not_run)} not run:")
    for block in not_run:
        print(f"  {block.where}: {block.not_run}")
    counted: dict[str, int] = {}
    for block in not_run:
        name = block.where.rsplit(":", 1)[0]
        counted[name] = counted.get(name, 0) + 1
    assert counted == NOT_RUN
    assert sum(b.where.startswith("README.md") for b in RUN) >= 4, "README's samples run"


@pytest.mark.parametrize("block", RUN, ids=[block.where for block in RUN])
def test_block_runs(block: Block, tmp_path: pathlib.Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"{block.where} failed:\n{block.code}\n{done.stderr}"
