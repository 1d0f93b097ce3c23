"""Paths in a Ray job. `ray job submit --working-dir .` runs the entrypoint inside Ray's unpacked copy of that
directory, deleted with the job: a relative input resolves inside the copy (it was uploaded, so it is there), a
relative output would be written into the copy and vanish. So inputs are made absolute, outputs must be."""
from __future__ import annotations

import sys
from pathlib import Path


def absolute_inputs(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """`argv` with the values of `flags` (inputs) made absolute against the job's working directory; a flag's
    values run to the next option (`--data A B`)."""
    out, take = [], False
    for arg in argv:
        name, eq, value = arg.partition("=")
        if take and not arg.startswith("-"):
            out.append(str(Path(arg).resolve()))
        elif name in flags and eq:
            out.append(f"{name}={Path(value).resolve()}")
        else:
            out.append(arg)
            take = arg in flags
    return out


def refuse_relative_outputs(argv: list[str], flags: tuple[str, ...], prog: str) -> None:
    """Exit with one line naming the first output flag given a relative path."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in flags:
            path = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if path and not Path(path).is_absolute():
                sys.exit(f"{prog}: error: {name} {path} is relative: in a Ray job it would be written inside Ray's "
                         f"copy of the working directory ({Path.cwd()}) and vanish with it; give an absolute path")
