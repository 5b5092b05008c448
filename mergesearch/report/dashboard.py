"""optuna-dashboard on a study's storage, or on a storage several studies share, with their
recipe artifacts, on 127.0.0.1 only (reach it from another machine through an ssh tunnel:
`ssh -L 8080:127.0.0.1:8080 HOST`, then open http://127.0.0.1:8080/dashboard here)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from ..errors import MergeSearchError
from ..search import open_storage, study_dir


class StudyArtifacts:
    """The artifact stores of several studies (results/<study>/artifacts) as one, for a dashboard
    that shows them all: an artifact id is a UUID, so it lies in exactly one of them."""

    def __init__(self, folders: list[Path]) -> None:
        from optuna.artifacts import FileSystemArtifactStore

        self.stores = {Path(f): FileSystemArtifactStore(str(f)) for f in folders if f.is_dir()}

    def _store_of(self, artifact_id: str):
        for folder, store in self.stores.items():
            if (folder / artifact_id).is_file():  # FileSystemArtifactStore keeps one file per id
                return store
        from optuna.artifacts.exceptions import ArtifactNotFound

        raise ArtifactNotFound(f"artifact {artifact_id} is in none of the studies' artifact folders")

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self._store_of(artifact_id).open_reader(artifact_id)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        raise MergeSearchError("the dashboard shows artifacts; mergesearch search writes them")

    def remove(self, artifact_id: str) -> None:
        self._store_of(artifact_id).remove(artifact_id)


def serve(study: str | None, storage: str | None = None, *, port: int = 8080) -> None:
    """Serve optuna-dashboard until Ctrl-C: one study (its own results/<study>/study.db), or every
    study in a shared `storage` (e.g. several searches run with the same `--storage`)."""
    import optuna
    from optuna_dashboard import run_server

    if study is None and storage is None:
        raise MergeSearchError(
            "name a study, or give --storage to show every study in a shared storage "
            "(e.g. searches run with --storage sqlite:///results/studies.db)"
        )
    st = open_storage(storage, study or "", create=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(st)]
    if study is not None and study not in names:
        raise MergeSearchError(
            f"study {study!r} is not in that storage (it has: {', '.join(names) or 'none'})"
        )
    shown = [study] if study else names
    url = f"http://127.0.0.1:{port}/dashboard"
    print(
        f"optuna-dashboard for {'study ' + study if study else f'{len(names)} studies: ' + ', '.join(names)}: "
        f"{url}  (Ctrl-C stops it; from another machine: ssh -L {port}:127.0.0.1:{port} THIS_HOST, "
        "then open the same URL there)",
        flush=True,
    )
    artifacts = StudyArtifacts([study_dir(n) / "artifacts" for n in shown])
    run_server(st, host="127.0.0.1", port=port, artifact_store=artifacts)
