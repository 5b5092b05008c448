"""The report: what a study learned, measured on data the search never saw, and the recipes to take
away. `build.report` orchestrates; `tables` (trials as rows, keyed by trial number), `scoring`
(re-scored recipes and their references), `plots`, `markdown`, `export` (mergekit YAML) and
`dashboard` (optuna-dashboard) each hold one concern; `files` writes atomically."""

from .build import report
from .export import export, trial_recipes
from .plots import coefficient_profile
from .tables import best_trial, front, load, trials_frame

__all__ = [
    "best_trial",
    "coefficient_profile",
    "export",
    "front",
    "load",
    "report",
    "trial_recipes",
    "trials_frame",
]
