"""Where a search's inputs live, and how each tensor reaches the device a candidate is merged on.

| placement | base and task vectors | what a candidate moves |
|---|---|---|
| `device` | loaded once onto the merge device (today's resident engine) | nothing |
| `host` | loaded once into host memory, pinned on CUDA | each input, host → device, over PCIe |
| `disk` | the checkpoint files themselves, memory-mapped | each input from the page cache (or the disk) |

On the CPU, `device` and `host` are the same memory. In every placement the live model is the
only full copy of a model on the merge device, and a task vector is `x − b` computed by the same
kernel in the same dtype (on the merge device, or on the CPU for `host`: IEEE subtraction rounds
alike everywhere), so every placement gives the same candidate bit for bit.

The streamed placements fetch task i+1's inputs in a background thread while task i merges:
on CUDA on a side stream (the copy overlaps the merge), on the CPU by computing τ from the
mapped pages into two reused buffers (the reads overlap). Two tasks' inputs are in flight at
most. Task arithmetic from the files on the CPU skips that τ: `stream(raw=True)` hands over the
mapped x (pages read ahead with madvise) and numba's merge kernel subtracts the base as it goes.
"""

from __future__ import annotations

import math
import mmap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, check_finite
from ..errors import MergeSearchError
from ..memory import available_memory, gib

PLACEMENTS = ("device", "host", "disk")
CHOICES = ("auto", *PLACEMENTS)

Key = tuple[str, str]  # (model reference, stored tensor name)

# What `auto` leaves free on the merge device beside the inputs and the live model: evaluation's
# batches and KV cache, and the allocator's slack.
HEADROOM = 0.25  # of the live model
HEADROOM_MIN = 2 << 30


@dataclass(frozen=True)
class Choice:
    """A placement and why: printed at the start of a search and recorded in its study."""

    placement: str
    reason: str

    def __str__(self) -> str:
        return f"inputs: {self.placement} ({self.reason})"


def input_bytes(models: dict[str, Checkpoint]) -> int:
    """Bytes of every input held resident: each model once (a task vector has its model's size)."""
    return sum(m.nbytes for ck in models.values() for m in ck.meta.values())


def choose(
    models: dict[str, Checkpoint], device: str | torch.device, live_bytes: int, asked: str = "auto"
) -> Choice:
    """`asked`, or under `auto` the first placement whose inputs fit: on the merge device beside
    the live model and evaluation's headroom; else in host memory (CUDA only); else the files."""
    if asked not in CHOICES:
        raise MergeSearchError(f"placement {asked!r}: use one of {', '.join(CHOICES)}")
    device = torch.device(device)
    need = input_bytes(models)
    headroom = max(HEADROOM_MIN, int(HEADROOM * live_bytes))
    free = available_memory(device)
    if asked == "device" and need + live_bytes > free:
        raise MergeSearchError(
            f"placement device: {gib(need)} of inputs and a {gib(live_bytes)} live model need "
            f"{gib(need + live_bytes)} on {device}, {gib(free)} is free; use placement host or disk (or auto)"
        )
    if asked != "auto":
        return Choice(asked, f"as asked; {gib(need)} of inputs")
    if need + live_bytes + headroom <= free:
        return Choice(
            "device", f"{gib(need)} of inputs fit beside the live model in {gib(free)} free on {device}"
        )
    if device.type == "cuda":
        host = available_memory("cpu")
        if need + HEADROOM_MIN <= host:
            return Choice(
                "host",
                f"{gib(need)} of inputs: not in {gib(free)} free on {device}, in {gib(host)} of host memory",
            )
        return Choice("disk", f"{gib(need)} of inputs: neither on {device} nor in {gib(host)} of host memory")
    return Choice(
        "disk", f"{gib(need)} of inputs and a {gib(live_bytes)} live model do not fit in {gib(free)} free"
    )


class Inputs:
    """A search engine's input tensors in one placement. A key is (model, stored name); with a
    base, the other models' floating tensors of the base's shape and dtype are task vectors
    τ = x − b, every other tensor is itself.

    `stream(key lists)` yields, per list, {key: tensor on the device} (τ for a task-vector key);
    the tensors of a streamed placement are valid until the next item is asked for."""

    def __init__(
        self,
        models: dict[str, Checkpoint],
        base: str | None,
        device: torch.device,
        placement: str = "device",
        *,
        check: bool = True,
    ) -> None:
        if placement not in PLACEMENTS:
            raise MergeSearchError(f"placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
        self.models, self.base, self.device, self.placement = models, base, device, placement
        self.cuda = device.type == "cuda"
        self.taus: set[Key] = set()  # keys held as task vectors
        if base is not None:
            bmeta = models[base].meta
            for ref, ck in models.items():
                for name, m in ck.meta.items():
                    b = bmeta.get(name)
                    if (
                        ref != base
                        and b
                        and m.dtype.is_floating_point
                        and m.shape == b.shape
                        and m.dtype == b.dtype
                    ):
                        self.taus.add((ref, name))
        self.staged: dict[Key, torch.Tensor] = {}  # a multi-stage recipe's intermediates
        self._held: dict[Key, torch.Tensor] = {}  # device / host: every input, loaded once
        self._views: dict[Key, torch.Tensor] = {}  # disk: views of the mapped files
        self._arenas: list[dict[torch.dtype, torch.Tensor]] = [{}, {}]  # disk on the CPU: τ buffers
        self._stream = torch.cuda.Stream(device) if self.cuda and placement != "device" else None
        if placement == "disk":
            self._map(check)
        else:
            self._load(device if placement == "device" else torch.device("cpu"))

    # -- loading --------------------------------------------------------------------

    def _order(self) -> list[str]:
        return ([self.base] if self.base else []) + [r for r in self.models if r != self.base]

    def _load(self, where: torch.device) -> None:
        pin = self.cuda and where.type == "cpu"
        for ref in self._order():
            ck = self.models[ref]
            for name in ck.meta:
                x = ck.get(name, where)
                check_finite(x, name, ck.path)
                if (ref, name) in self.taus:
                    x.sub_(self._held[(self.base, name)])  # in place: no second copy of the model
                if pin:
                    x = _pinned(x)
                self._held[(ref, name)] = x
            ck.close()

    def _map(self, check: bool) -> None:
        maps: dict[Path, mmap.mmap] = {}
        for ref in self._order():
            ck = self.models[ref]
            for name, m in ck.meta.items():
                if m.file.suffix == ".bin":  # torch.load(mmap=True) already maps pickled files
                    x = ck.get(name)
                else:
                    if m.file not in maps:
                        with open(m.file, "rb") as fh:  # private: a stray write never reaches the file
                            maps[m.file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
                    x = _view(maps[m.file], m.offset, m.nbytes, m.dtype, m.shape)
                if check:  # one read of every input, before any candidate
                    check_finite(x, name, ck.path)
                self._views[(ref, name)] = x
        self._maps = maps

    # -- access ---------------------------------------------------------------------

    def weights(self, ref: str) -> dict[str, torch.Tensor]:
        """One model's tensors by name (where they are held; for building the live model)."""
        if ref in self.taus_of():
            raise MergeSearchError(f"{ref}: held as task vectors; its weights are not kept")
        held = self._views if self.placement == "disk" else self._held
        return {name: t for (r, name), t in held.items() if r == ref}

    def taus_of(self) -> set[str]:
        return {ref for ref, _ in self.taus}

    def base_numel(self) -> int:
        return sum(math.prod(m.shape) for m in self.models[self.base].meta.values()) if self.base else 0

    def tensor(self, ref: str, name: str) -> torch.Tensor:
        """One input where it is held (τ for a task-vector key; from the files, a new tensor):
        for tests and tools, not for the merge loop, which streams."""
        key = (ref, name)
        if self.placement != "disk":
            return self._held[key]
        x = self._views[key]
        return x - self._views[(self.base, name)] if key in self.taus else x

    def mapped(self, ref: str, name: str) -> torch.Tensor:
        """A model's own tensor as its file holds it (`disk` placement only), τ keys included."""
        return self._views[(ref, name)]

    def is_task_vector(self, key: Key) -> bool:
        return key in self.taus

    def stage(self, ref: str, tensors: dict[str, torch.Tensor]) -> None:
        self.staged.update({(ref, k): v for k, v in tensors.items()})

    def unstage(self, ref: str) -> None:
        for key in [k for k in self.staged if k[0] == ref]:
            del self.staged[key]

    def owns(self, t: torch.Tensor) -> bool:
        """Whether `t` lies in a buffer this object reuses (a caller that keeps it must copy it)."""
        ptr = t.untyped_storage().data_ptr()
        return any(a.untyped_storage().data_ptr() == ptr for arena in self._arenas for a in arena.values())

    def stream(self, key_lists: list[list[Key]], raw: bool = False) -> Iterator[dict[Key, torch.Tensor]]:
        """Per key list, its tensors on the merge device; streamed placements fetch the next
        list while the caller merges this one. `raw` (disk on the CPU): a task-vector key gives
        the model's own tensor x, for a merge that makes τ = x − b itself."""
        if raw and not (self.placement == "disk" and not self.cuda):
            raise ValueError("Inputs.stream: raw is for the disk placement on the CPU")
        if self.placement == "device" or (self.placement == "host" and not self.cuda):
            for keys in key_lists:
                yield {k: self.staged[k] if k in self.staged else self._held[k] for k in keys}
            return
        with ThreadPoolExecutor(1, thread_name_prefix="mergesearch-fetch") as pool:
            pending = pool.submit(self._fetch, key_lists[0], 0, raw) if key_lists else None
            for i in range(len(key_lists)):
                got, event = pending.result()
                more = i + 1 < len(key_lists)
                pending = pool.submit(self._fetch, key_lists[i + 1], (i + 1) % 2, raw) if more else None
                if event is not None:  # the side stream's copies before this stream's merge
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for t in got.values():
                        t.record_stream(current)
                yield got

    def _fetch(self, keys: list[Key], slot: int, raw: bool = False) -> tuple[dict[Key, torch.Tensor], object]:
        """One task's inputs on the merge device (runs in the fetch thread)."""
        if raw:  # the pages themselves, read ahead of the merge
            for k in keys:
                if k not in self.staged:
                    self._read_ahead(k)
            return {k: self.staged[k] if k in self.staged else self._views[k] for k in keys}, None
        if self._stream is None:
            return self._fetch_cpu(keys, slot), None
        with torch.cuda.stream(self._stream):
            got = {}
            for k in keys:
                if k in self.staged:
                    got[k] = self.staged[k]
                elif self.placement == "host":  # τ already in pinned host memory
                    got[k] = self._held[k].to(self.device, non_blocking=True)
                else:  # disk: x and b over PCIe, τ = x − b on the device (same bytes as τ)
                    got[k] = self._views[k].to(self.device, non_blocking=True)
                    if k in self.taus:
                        b = self._views[(self.base, k[1])].to(self.device, non_blocking=True)
                        got[k] = got[k].sub_(b)
            event = torch.cuda.Event()
            event.record(self._stream)
        return got, event

    def _read_ahead(self, key: Key) -> None:
        """Ask the kernel to read a mapped tensor's pages now (madvise WILLNEED), so the merge
        finds them in the page cache."""
        meta = self.models[key[0]].meta[key[1]]
        mm = self._maps.get(meta.file)
        if mm is None or not meta.nbytes:  # a pickled file: torch.load mapped it
            return
        start = meta.offset // mmap.PAGESIZE * mmap.PAGESIZE
        mm.madvise(mmap.MADV_WILLNEED, start, meta.offset + meta.nbytes - start)

    def _fetch_cpu(self, keys: list[Key], slot: int) -> dict[Key, torch.Tensor]:
        """disk on the CPU: views of the mapped files; τ = x − b into this slot's buffers."""
        got, sizes = {}, {}
        for k in keys:
            if k in self.taus:
                x = self._views[k]
                sizes[x.dtype] = sizes.get(x.dtype, 0) + x.numel()
        arena = self._arenas[slot]
        for dtype, n in sizes.items():
            if dtype not in arena or arena[dtype].numel() < n:
                arena.pop(dtype, None)
                arena[dtype] = torch.empty(n, dtype=dtype)
        used = dict.fromkeys(sizes, 0)
        for k in keys:
            if k in self.staged:
                got[k] = self.staged[k]
            elif k in self.taus:
                x, b = self._views[k], self._views[(self.base, k[1])]
                start = used[x.dtype]
                used[x.dtype] += x.numel()
                out = arena[x.dtype][start : used[x.dtype]].view(x.shape)
                got[k] = torch.sub(x, b, out=out)  # the kernel `x.sub_(b)` runs: the same bits
            else:
                got[k] = self._views[k]
        return got

    def nbytes_held(self) -> int:
        """Bytes this object holds in memory it allocated (not mapped files)."""
        held = sum(t.numel() * t.element_size() for t in self._held.values())
        return held + sum(a.numel() * a.element_size() for arena in self._arenas for a in arena.values())


def _view(mm: mmap.mmap, offset: int, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).view(shape)


_PIN_WARNED = threading.Event()


def _pinned(x: torch.Tensor) -> torch.Tensor:
    """x in page-locked memory, so copies to the GPU run asynchronously; pageable when the
    system refuses to lock more (the copies are then synchronous, the candidate the same)."""
    try:
        return x.pin_memory()
    except RuntimeError:
        if not _PIN_WARNED.is_set():
            _PIN_WARNED.set()
            import warnings

            warnings.warn(
                "could not pin host memory for the inputs; copies to the GPU will not overlap", stacklevel=2
            )
        return x
