"""Everything that talks to the user's terminal: the one-line error, progress bars that stay out of log
files, and log lines that do not break a bar.

This module imports nothing from the rest of `common/`, so every other module can use it (no import cycles).

Progress bars are drawn only when both stdout and stderr are terminals: in a log file (`nohup`, `> log`,
Colab's `!python ...`, a pipe) a carriage-return bar would run into the log lines (`RCS stats ...: 0%| |
0/8  step 5/40 | ...`). Log lines always go through `log()`, which is `tqdm.write` (it clears the bars,
prints the line on its own line and redraws them) and a plain `print` when no bar is shown.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Optional

from common.cli import UserError  # noqa: F401  one class for bad input, whichever run_cli catches it


def bars_enabled() -> bool:
    """True when progress bars may be drawn: stdout and stderr are both terminals."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams (notebooks, pytest capture)
        return False


def progress(iterable: Optional[Iterable] = None, **kwargs: Any):
    """`tqdm(iterable, **kwargs)`, disabled (a plain iterator with `update`/`close`) unless bars_enabled()."""
    from tqdm import tqdm
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=not bars_enabled(), **kwargs)


def log(line: str) -> None:
    """Print one log line to stdout (flushed) without breaking a progress bar that is being drawn."""
    if bars_enabled():
        from tqdm import tqdm
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(line, flush=True)
