"""mergesearch: learn model-merge coefficients.

The pipeline, one module (or subpackage) per concept:
recipe (mergekit YAML) → plan (tensors, inputs, parameters) → engine (disk merge, resident
candidates; math in `methods`) →
evaluation (tasks, native harness, lm-eval) → study (search spaces in `space`, Optuna) →
report (tables, plots, held-out scores, mergekit export). `checkpoint` and `architecture`
read and write Hugging Face folders; `zoo` builds the demo models; `cli` is a thin shell.
"""

from .errors import MergeSearchError

__version__ = "0.1.0"
__all__ = ["MergeSearchError", "__version__"]
