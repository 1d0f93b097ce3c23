"""The docs: docs/reference/ matches the code (kedit_ray.refdoc), README.md stays short, and every shell block of
README.md and docs/guide/*.md runs (slow), shrunk the same way every time:

    --limit N            → --limit 2, and the other sizes in SHRINK likewise (a command of ADDED without the flag
                           gets it: `kedit eval` → `kedit eval --limit 2`), so that a block takes minutes, not hours;
                           `kedit trace --suggest-layer` gets 20 (the model may know none of 2 facts)
    --out / --png / --save / --save-model X
                         → a temporary path, and X is replaced by it everywhere in the block (`kedit report X`)
    make test, make test-slow   not run ("recursion"); make install / clean / distclean / bench not run either
    make docs            → python -m kedit_ray.refdoc --check (nothing rewritten)
    make TARGET          → make -o .venv/.installed TARGET (the venv is not reinstalled)

A block is one bash script (`set -e`), run from the repository root with .venv/bin first on PATH and a local Ray
($RAY_ADDRESS unset). A block right after a line `<!-- docs-test: skip (REASON) -->` is skipped with REASON.
"""
from __future__ import annotations

import difflib
import os
import re
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from kedit_ray import refdoc

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"```(bash|sh|shell)")
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.*)\)\s*-->")
SHRINK = {"--limit": "2", "--samples": "2", "--steps": "2", "--batch-size": "1", "--checkpoints": "1,2",
          "--checkpoint-sample": "1", "--held-out": "1", "--ppl-docs": "1"}
ADDED = {r"kedit (?:eval|trace)|jobs/evaluate\.py": "--limit", r"kedit train": "--steps",
         r"kedit stats|jobs/precompute_stats\.py": "--samples"}   # command -> the size flag it gets when it lacks it
OUTPUTS = ("--out", "--png", "--save", "--save-model", ">")   # ">": a shell redirection
NOT_RUN = {"test": "recursion", "test-slow": "recursion", "install": "it would reinstall the environment",
           "clean": "it would delete build files", "distclean": "it would delete the environment",
           "bench": "the benchmarks take too long"}
TIMEOUT = 1800   # seconds per block


# ---------------------------------------------------------------- fast

def test_reference_pages_are_up_to_date():
    generated = refdoc.pages()
    stale = refdoc.stale(generated)
    diffs = "".join("".join(list(difflib.unified_diff(
        p.read_text().splitlines(True) if p.exists() else [], generated[p].splitlines(True),
        str(p.relative_to(ROOT)), "generated"))[:30]) for p in stale)
    assert not stale, (f"{', '.join(str(p.relative_to(ROOT)) for p in stale)} out of date with the code: "
                       f"run make docs\n{diffs}")


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines, more than 200: move the detail to docs/guide/"


# ---------------------------------------------------------------- the blocks

@dataclass
class Block:
    path: Path
    line: int          # of the opening fence, 1-based
    text: str
    skip: str | None   # the reason of a `docs-test: skip` line right before it

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:L{self.line}"


def find_blocks(path: Path) -> list[Block]:
    """The ```bash / ```sh / ```shell blocks of a Markdown file."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if FENCE.fullmatch(lines[i].strip()):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
            skip = SKIP.search(lines[i - 1]) if i else None
            out.append(Block(path, i + 1, textwrap.dedent("\n".join(lines[i + 1:end])), skip and skip.group(1)))
            i = end
        i += 1
    return out


def commands(text: str) -> list[str]:
    """The block's commands, a line continued with a trailing backslash joined to the next; comment lines left out."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
        else:
            out.append(pending)
            pending = ""
    return out + [pending] if pending else out


def _make(command: str) -> tuple[str | None, str | None]:
    """(the command to run instead of `make ...`, or None with the reason it is not run)."""
    words = command.split(" #")[0].split()
    targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w] or ["install"]
    for target in targets:
        if target in NOT_RUN:
            return None, f"make {target}: {NOT_RUN[target]}"
    if targets == ["docs"]:
        return "python -m kedit_ray.refdoc --check", None
    return f"make -o .venv/.installed {' '.join(words[1:])}", None


def shrink(text: str, tmp: Path) -> tuple[str, list[str]]:
    """(the block as a bash script, shrunk and with its outputs under `tmp`; why commands were left out)."""
    runs, dropped = [], []
    for command in commands(text):
        if command.startswith("make "):
            command, why = _make(command)
            if command is None:
                dropped.append(why)
                continue
        for flag, value in SHRINK.items():
            command = re.sub(rf"(?<!\S){flag}([ =])\S+", rf"{flag}\g<1>{value}", command)
        for pattern, flag in ADDED.items():
            found = re.search(rf"(?<!\S)(?:\S*/)?(?:{pattern})(?=\s|$)", command)
            if found and not re.search(rf"(?<!\S){flag}[ =]", command):
                command = f"{command[:found.end()]} {flag} {SHRINK[flag]}{command[found.end():]}"
        if re.search(r"kedit trace\b", command) and "--suggest-layer" in command:   # 2 facts may hold none it knows
            command = re.sub(r"(?<!\S)--limit([ =])\S+", r"--limit\g<1>20", command)
        runs.append(command)
    script = "\n".join(runs)
    for i, value in enumerate(dict.fromkeys(outputs(script))):
        moved = tmp / f"{i}-{Path(value).name or 'out'}"
        script = re.sub(rf"(?<![^\s=]){re.escape(value)}(?=/|\s|$)", str(moved).replace("\\", "\\\\"), script)
    return script, dropped


def outputs(text: str) -> list[str]:
    """The paths a block's commands write (--out and the like)."""
    return [v.rstrip("/") for v in re.findall(rf"(?<!\S)(?:{'|'.join(OUTPUTS)})[ =]([^\s;&|]+)", text)
            if v != "/dev/null"]


def with_inputs(block: Block, blocks: list[Block]) -> str:
    """The block's text after the earlier blocks of its page that write a path it reads (a reader runs a page in
    order: `kedit report runs/rome` after the `kedit eval --out runs/rome` above it)."""
    text = block.text
    for earlier in reversed([b for b in blocks if b.path == block.path and b.line < block.line and b.skip is None]):
        if any(re.search(rf"(?<![^\s=]){re.escape(v)}(?=/|\s|$)", text) for v in outputs(earlier.text)):
            text = f"{earlier.text}\n{text}"
    return text


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "KEDIT_STATS_CACHE")}
    # KEDIT_STATS_CACHE: the tests' empty cache (conftest); the commands use the reader's, as the docs say
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


BLOCKS = [b for doc in [README, *sorted((ROOT / "docs" / "guide").glob("*.md"))] for b in find_blocks(doc)]


def test_blocks_are_found_and_shrunk(tmp_path):
    """The machinery of the slow test below, on a made-up page."""
    page = tmp_path / "page.md"
    page.write_text("text\n```bash\nmake demo   # the demo\nmake test\n```\n\n<!-- docs-test: skip (needs a GPU) -->\n"
                    "```sh\nkedit stats --samples 2000\n```\n```python\nprint()\n```\n```shell\n"
                    "kedit eval --method rome \\\n    --data d.json --workers 2 --out runs/rome   # two workers\n"
                    "kedit eval --limit 100 --out=runs/ft --png docs/x.png\nkedit report runs/rome runs/ft/\n"
                    ".venv/bin/kedit train --method ke --out runs/ke\n```\n")
    one, two, three = find_blocks(page)
    assert (one.line, one.skip, two.line, two.skip, three.line) == (2, None, 8, "needs a GPU", 14)
    assert shrink(one.text, tmp_path) == ("make -o .venv/.installed demo", ["make test: recursion"])
    script, dropped = shrink(three.text, tmp_path)
    rome, ft = tmp_path / "0-rome", tmp_path / "1-ft"
    assert script.splitlines() == [
        f"kedit eval --limit 2 --method rome --data d.json --workers 2 --out {rome}   # two workers",
        f"kedit eval --limit 2 --out={ft} --png {tmp_path / '2-x.png'}",
        f"kedit report {rome} {ft}/", f".venv/bin/kedit train --steps 2 --method ke --out {tmp_path / '3-ke'}"]
    assert dropped == [] and shrink(two.text, tmp_path)[0] == "kedit stats --samples 2"
    page.write_text("```bash\nkedit eval --out runs/a\n```\n```bash\nkedit eval --out runs/b\n```\n"
                    "```bash\nkedit report runs/a\n```\n")
    blocks = find_blocks(page)
    assert with_inputs(blocks[2], blocks) == "kedit eval --out runs/a\nkedit report runs/a"   # not runs/b's
    assert with_inputs(blocks[1], blocks) == "kedit eval --out runs/b"
    script, _ = shrink("printf x > facts.jsonl\nkedit eval --data facts.jsonl --out r 2>/dev/null >/dev/null", tmp_path)
    assert script == f"printf x > {tmp_path / '0-facts.jsonl'}\n" \
                     f"kedit eval --limit 2 --data {tmp_path / '0-facts.jsonl'} --out {tmp_path / '1-r'} 2>/dev/null >/dev/null"


def test_the_readme_blocks_parse():
    """Every shell block of the docs is found, with a line number that points at its fence."""
    for block in BLOCKS:
        assert FENCE.fullmatch(block.path.read_text().splitlines()[block.line - 1].strip()), block.id
        assert block.skip is not None or commands(block.text), f"{block.id}: an empty block"


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_a_shell_block_runs(block: Block, tmp_path):
    if block.skip is not None:
        pytest.skip(block.skip)
    script, dropped = shrink(with_inputs(block, BLOCKS), tmp_path)
    if not script:
        pytest.skip("; ".join(dropped))
    trap = "trap 'echo \"docs-test: this command failed: $BASH_COMMAND\" >&2' ERR\n"
    try:
        done = subprocess.run(["bash", "-eo", "pipefail", "-c", trap + script], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.id}: still running after {TIMEOUT} s\n{script}\n{(e.stderr or b'')[-3000:]!r}")
    assert done.returncode == 0, (f"{block.id}: exit status {done.returncode}; ran (shrunk):\n{script}\n"
                                  f"--- stderr (tail) ---\n{done.stderr[-3000:]}")
