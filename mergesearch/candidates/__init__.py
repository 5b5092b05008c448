"""The search's candidates: a recipe written into one live model, fast, with the work that
candidates share done once per study.

| module | what it is for |
|---|---|
| `resident.py` | `ResidentEngine`: inputs resident, each candidate written in place into the live model |
| `bank.py` | `TaskVectorBank`: which methods, dtypes and devices it makes (`supports`), each tensor's masks, which backend merges |
| `cuts.py` | `Cuts`: a rank window of \\|τ\\| as a `Cut` (values, tie positions), found without sorting τ |
| `draws.py` | `Draws`: DARE's and DELLA's uniforms, a fixed function of (seed, task vector, index); DARE's level sums |
| `ranks.py` | `DellaRanks`: DELLA's per-row ranks, chunk by chunk, optionally sorted once per study |
| `norms.py` | `Norms`: ‖τ‖₁, ‖τ⊙m‖₁ and the L1 rescale, taken alike whichever backend merges |
| `masks.py` | the keep masks as data: a cut, draws, ranks — what the passes apply |
| `passes.py` | `Passes`: the one signature every backend implements; `Mix`, how a tensor combines |
| `torch_passes.py` | `TorchPasses`: every pass in torch, on any device, through a `Workspace` of named buffers |
| `numba_passes.py` | `NumbaPasses`: the same passes as CPU kernels, masks packed into named columns |
| `numba_kernels.py` | the numba kernels themselves, bit for bit the torch passes |

The contract with mergekit 0.1.5 (tested in tests/test_task_vector_bank.py, tests/test_passes.py
and tests/test_resident_engine.py):
- task_arithmetic, and ties / breadcrumbs(_ties) without `rescale`, are mergekit's result bit for
  bit, except where equal magnitudes straddle a cut: mergekit's result then depends on the order
  its unstable argsort gives ties; here the lower flat index goes first. `TaskVectorBank.exact_for`
  says which case a call is in, and the exact engine uses the bank only then.
- DARE and DELLA keep mergekit's probabilities (DELLA's per-row ranks too) and its L1 rescale, but
  draw from `draws.py` instead of torch's global RNG: mergekit's model of an exported recipe is
  another draw of the same distribution. That is why reports score every recipe again with the
  exact engine (`ResidentEngine(exact=True)`, the model `mergekit-yaml --random-seed 0` builds).
- A method, dtype or device the bank does not declare (`TaskVectorBank.supports`) takes the
  reference in `methods/`: slower, never another method's result. A new sparsifier registered in
  `methods/sparsify.py` is searched through it until the bank implements it.
"""

from .bank import TaskVectorBank
from .resident import ResidentEngine, return_freed_memory

__all__ = ["ResidentEngine", "TaskVectorBank", "return_freed_memory"]
