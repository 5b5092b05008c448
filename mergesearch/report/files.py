"""Files a report or an export writes: whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def atomic(path: Path, write) -> None:
    """write(tmp) then rename over `path`: readers see the old file or the new one, and a failed
    write (a full disk) leaves neither a partial file nor the temporary one. An OSError names
    `path` (the file the user asked for), not the temporary file or no file at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename in (None, str(tmp), tmp):
            e.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic(path, lambda tmp: tmp.write_text(text))


def atomic_csv(df: pd.DataFrame, path: Path) -> None:
    atomic(path, lambda tmp: df.to_csv(tmp, index=False))
