"""Where a study lives: SQLite under results/<study>/ by default; a journal file (`*.log` /
`*.journal`) for several processes on one machine; PostgreSQL (or any SQLAlchemy URL) across
machines. Recipes are also Optuna artifacts under results/<study>/artifacts."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import optuna

from ..errors import MergeSearchError
from . import interrupts

RESULTS = Path(os.environ.get("MERGESEARCH_RESULTS", "results"))


def study_dir(study: str) -> Path:
    """results/<study>; a name that would leave results/ (a path, `..`) is refused."""
    if not study or study in (".", "..") or "/" in study or "\\" in study or "\0" in study:
        raise MergeSearchError(
            f"study name {study!r} is not a plain name (no '/', '\\' or '..'): it names the folder "
            f"results/<study>; pick a name like my_study"
        )
    return RESULTS / study


def open_storage(url: str | None, study: str, *, create: bool = True) -> optuna.storages.BaseStorage:
    """SQLite file by default, a journal file for *.log/*.journal paths, else an RDB URL.

    `create=False` (report, export, worker, dashboard) opens only what exists: a missing SQLite file
    or journal is an error, not a new empty one left behind."""
    if url is None:
        db = study_dir(study) / "study.db"
        if not create and not db.is_file():
            raise MergeSearchError(
                f"no study {study!r}: {db} does not exist; run `mergesearch search` first, or pass "
                "--storage where the study lives"
            )
        db.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{db}"
    if url.endswith((".log", ".journal")) and "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        path = Path(url)
        if not create and not path.is_file():
            raise MergeSearchError(
                f"{path}: journal file does not exist; check --storage (a study's journal path)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_journal(path)
        return interrupts.guard(optuna.storages.JournalStorage(JournalFileBackend(url)))
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        if not create and not path.is_file():
            raise MergeSearchError(f"{path}: SQLite file does not exist; check --storage")
        if not path.parent.is_dir():
            raise MergeSearchError(
                f"{path.parent}: folder of the SQLite file in --storage {url} does not exist; create it or fix the URL"
            )
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" but long-standing
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90)
        return interrupts.guard(storage)
    except Exception as e:  # SQLAlchemy raises many types for a bad URL or an unreachable server
        msg = " ".join(str(e).split("(Background on this error")[0].split())
        raise MergeSearchError(f"storage {url!r} cannot be opened ({type(e).__name__}: {msg})") from e


def repair_journal(path: Path) -> int:
    """Drop the records an interrupted write left unreadable (a full disk, a kill mid-write).

    Optuna's journal reader stops at a record without its newline, so a torn *last* record hides
    nothing; but the next append lands after it, and from then on the file fails to load and every
    completed trial is out of reach. Under the journal's own lock, records that do not parse are
    removed (the file is rewritten atomically) before anyone appends. Returns how many."""
    import json

    from optuna.storages.journal import JournalFileSymlinkLock
    from optuna.storages.journal._file import get_lock_file

    if not path.is_file() or path.stat().st_size == 0:
        return 0
    with get_lock_file(JournalFileSymlinkLock(str(path))):
        data = path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline, else a torn record
        good, bad = [], 0 if not tail else 1
        for line in lines:
            try:
                json.loads(line)
                good.append(line)
            except ValueError:
                bad += 1
        if not bad:
            return 0
        tmp = path.with_name(path.name + ".repair")
        tmp.write_bytes(b"".join(x + b"\n" for x in good))
        os.replace(tmp, path)
    warnings.warn(
        f"{path}: removed {bad} unreadable journal record(s) left by an interrupted write "
        "(a full disk or a killed process); every completed record is kept",
        stacklevel=2,
    )
    return bad


def artifact_store(study: str):
    from optuna.artifacts import FileSystemArtifactStore

    d = study_dir(study) / "artifacts"
    d.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(d))


def os_error_within(e: BaseException | None) -> OSError | None:
    """The OSError (a full or read-only disk) under an exception Optuna raised while handling it."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
