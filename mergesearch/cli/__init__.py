"""Command line: parse (`parser.py`), call the library (`commands.py`), print. Every error a user
can cause is one line and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..errors import MergeSearchError
from .parser import build_parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning  # what happened, not where in our code
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "device", None) is not None:
            from ..modeling import resolve_device

            args.device = resolve_device(args.device)
        return args.func(args)
    except MergeSearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only folder: say which file and what to do
        print(f"error: {os_error(e)}", file=sys.stderr)
        return 2


def os_error(e: OSError) -> str:
    import errno

    where = e.filename or "a file"
    advice = {
        errno.ENOSPC: "the disk is full; free space (completed trials are kept) and run the command again",
        errno.EROFS: "the file system is read-only; choose a writable folder (MERGESEARCH_RESULTS, --storage, -o, OUT_DIR)",
        errno.EACCES: "permission denied; choose a folder you can write (MERGESEARCH_RESULTS, --storage, -o, OUT_DIR)",
        errno.EDQUOT: "the disk quota is used up; free space and run the command again",
    }.get(e.errno, "check the path and run the command again")
    return f"{where}: {e.strerror or e}; {advice}"
