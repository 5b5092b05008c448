"""mergesearch: learn model-merge coefficients.

Pipeline: recipe → engine → evaluation → study → report. Each stage is one module:
`recipe` (mergekit YAML), `engine` (disk merge), `methods` (the math), `checkpoint`
(Hugging Face folders), `architecture` (tensor name → layer and component).
"""

from .errors import MergeSearchError

__version__ = "0.1.0"
__all__ = ["MergeSearchError", "__version__"]
