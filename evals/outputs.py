"""Where the repository's programs write, and the one-line answer when a figure cannot be drawn.

Every program writes under `out/` (git ignores it) unless told otherwise, and never into `docs/`:
the committed figures there are documentation, and a rerun that overwrote them, or read one back
as its resume state, would change the docs and measure nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

OUT_DIR = Path("out")
PLOT_EXTRA = 'pip install -e ".[plot]"'


def default_out(name: str) -> str:
    """`out/NAME`: the default path of a program's output file."""
    return str(OUT_DIR / name)


def prepare(path: str | Path) -> Path:
    """The path, with its folder made: `--json out/x.json` works on a fresh clone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def matplotlib_missing(prog: str, flag: str) -> bool:
    """True (and one line on stderr naming the extra to install) when matplotlib is absent.

    Called before any work, so a run that asked for a figure does not measure for minutes and
    then die on an ImportError; the caller exits 2, as for any other bad argument.
    """
    if importlib.util.find_spec("matplotlib") is not None:
        return False
    print(f"{prog}: {flag} needs matplotlib, the `plot` extra: {PLOT_EXTRA}", file=sys.stderr)
    return True
