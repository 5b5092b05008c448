"""optuna-dashboard on a study's storage, with its recipe artifacts, on 127.0.0.1 only."""

from __future__ import annotations

from .errors import MergeSearchError
from .study import open_storage, study_dir


def serve(study: str, storage: str | None = None, *, port: int = 8080) -> None:
    import optuna
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import run_server

    st = open_storage(storage, study, create=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(st)]
    if study not in names:
        raise MergeSearchError(
            f"study {study!r} is not in that storage (it has: {', '.join(names) or 'none'})"
        )
    art = study_dir(study) / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    print(
        f"optuna-dashboard for study {study}: http://127.0.0.1:{port}/dashboard  (Ctrl-C stops it)",
        flush=True,
    )
    run_server(st, host="127.0.0.1", port=port, artifact_store=FileSystemArtifactStore(str(art)))
