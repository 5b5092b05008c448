"""The per-example verdict matrix (search/verdicts.py): every scored candidate's verdict on every
search example it was scored on, stored in the study, kept across a resume and a second process,
and read by a later study on the same tasks and models."""

from __future__ import annotations

import numpy as np
import pytest

from mergesearch.search import load_space
from mergesearch.search.trials import StudyAttr, records
from mergesearch.search.verdicts import comparable, matrix, shared_matrix
from tests.conftest import search, write_space


@pytest.mark.e2e
def test_every_trial_records_its_verdicts_and_later_studies_read_them(zoo, tmp_path, results):
    db = f"sqlite:///{tmp_path / 'verdicts.db'}"
    space = load_space(write_space(tmp_path, name="v", trials=6, baselines=False))
    s = search(space, study="v", storage=db, progress=False)
    done = [t for t in records(s) if t.scores]
    assert len(done) == 6
    for t in done:  # a prefix of the split at the rung reached; its mean is the trial's score
        for task, score in t.scores.items():
            v = t.verdicts[task]
            assert len(v) == t.examples[task] in (20, 60)
            assert np.mean([c == "1" for c in v]) == pytest.approx(score, abs=1e-12)
    m = matrix([s], "add")
    assert m.values.shape == (6, 60) and m.rows == [("v", t.number) for t in done]
    first = m.values.copy()

    # a resume, then a second process on the same storage: rows are added, none change
    search(space, study="v", storage=db, progress=False, trials=8, set_budget=True)
    search(space, study="v", storage=db, progress=False, trials=10, worker=True)
    m = matrix([s], "add")
    assert m.values.shape[0] == 10
    np.testing.assert_array_equal(m.values[:6], first)

    # a new study on the same tasks and models reads every comparable row of the storage
    other = search(load_space(write_space(tmp_path, name="w", trials=2, baselines=False)), study="w",
                   storage=db, progress=False)  # fmt: skip
    fingerprint = s.user_attrs[StudyAttr.SEARCH_SPLITS]["add"]
    folders = set(s.user_attrs[StudyAttr.MODEL_FOLDERS].values())
    assert comparable(other, "add", fingerprint, folders)
    shared = shared_matrix(db, "add", fingerprint, folders)
    assert {r[0] for r in shared.rows} == {"v", "w"} and shared.values.shape[0] == 12
    assert (shared.scored[:20] == 12).all()  # every candidate saw the first rung's examples
    # another split (or other models) is not comparable: nothing is read from it
    assert not comparable(other, "add", "another split", folders)
    assert not comparable(other, "add", fingerprint, folders - {next(iter(folders))})
    assert shared_matrix(db, "add", "another split", folders).values.shape[0] == 0
