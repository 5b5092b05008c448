"""The search: an Optuna study in real storage whose trials are recipes scored in memory.

space (what is searched: `space.py`, read by `space_file.py`; the known recipes it can express:
`known_recipes.py`) → bench (the loaded models, engine and scorer: `bench.py`) → study (created,
resumed, joined: `studies.py`, stored by `storage.py`) → run (the loop: `run.py`, proposing with
`samplers.py`, each trial an `objective.py` writing one `trials.TrialRecord`; `convergence.py`
says when to stop). `gradient.py` learns a warm start; `rounds.py` runs a search in rounds whose
elites join the next round's inputs; `interrupts.py` keeps Ctrl-C out of storage writes.
"""

from .bench import MERGE_SEED, Bench, resolve_folder
from .run import run_search
from .space import SearchSpace
from .space_file import load_space, space_from_dict
from .storage import open_storage, study_dir
from .studies import load_study_space, space_of
from .trials import TrialRecord, records

__all__ = [
    "MERGE_SEED",
    "Bench",
    "SearchSpace",
    "TrialRecord",
    "load_space",
    "load_study_space",
    "open_storage",
    "records",
    "resolve_folder",
    "run_search",
    "space_from_dict",
    "space_of",
    "study_dir",
]
