"""The search's candidates: a recipe written into one live model, fast, with the work that
candidates share done once per study.

| module | what it is for |
|---|---|
| `resident.py` | `ResidentEngine`: inputs resident, each candidate written in place into the live model |
| `bank.py` | `TaskVectorBank`: which pass a candidate takes and what it caches (cuts, norms, draws, ranks) |
| `cuts.py` | a rank window of \\|τ\\| as a `Cut` (values and tie positions), found without sorting τ |
| `draws.py` | DARE's and DELLA's uniforms: a fixed function of (seed, task vector, index) |
| `masks.py` | the keep masks, given a cut, a draws function or a ranks function |
| `torch_passes.py` | the merge a chunk at a time in torch, on any device, through a `Workspace` |
| `numba_passes.py` | the same passes as numba kernels on the CPU, bit for bit the torch ones |

The contract with mergekit 0.1.5 (tested in tests/test_task_vector_bank.py and
tests/test_fused_kernels.py; NOTES.md, "Shared work"):
- task_arithmetic, and ties / breadcrumbs(_ties) without `rescale`, are mergekit's result bit for
  bit, except where equal magnitudes straddle a cut: mergekit's result then depends on the order
  its unstable argsort gives ties; here the lower flat index goes first. `TaskVectorBank.exact_for`
  says which case a call is in, and the exact engine uses the bank only then.
- DARE and DELLA keep mergekit's probabilities (DELLA's per-row ranks too) and its L1 rescale, but
  draw from `draws.py` instead of torch's global RNG: mergekit's model of an exported recipe is
  another draw of the same distribution. That is why reports score every recipe again with the
  exact engine (`ResidentEngine(exact=True)`, the model `mergekit-yaml --random-seed 0` builds).
- A sparsification the bank does not declare (`TaskVectorBank.supports`) takes the reference in
  `methods/`: slower, never another method's result.
"""

from .bank import TaskVectorBank
from .resident import ResidentEngine, return_freed_memory

__all__ = ["ResidentEngine", "TaskVectorBank", "return_freed_memory"]
