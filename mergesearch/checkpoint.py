"""Hugging Face model folders in and out: lazy reads, streamed atomic sharded writes."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .architecture import Architecture, architecture_for, num_layers
from .errors import MergeSearchError

TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(name: str | None, key: str = "dtype") -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise MergeSearchError(f"{key}: unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = 0  # byte offset of the data in a safetensors file
    nbytes: int = 0


class Checkpoint:
    """A model folder read lazily: tensor metadata up front, data one tensor at a time."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise MergeSearchError(f"{self.path}: model folder does not exist")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise MergeSearchError(f"{cfg}: missing; a Hugging Face model folder needs config.json")
        try:
            self.config: dict = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise MergeSearchError(f"{cfg}: not valid JSON ({e})") from e
        self.arch: Architecture = architecture_for(self.config)
        self.num_layers = num_layers(self.config, self.arch)
        self.meta: dict[str, TensorMeta] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._open: dict[Path, Any] = {}
        self._allow_pickle = allow_pickle
        self._index()
        layers = [i for i in self.by_layer if i is not None]
        if layers and self.num_layers != max(layers) + 1:
            # an unfamiliar config key, or a config that disagrees with the weights: trust the weights
            self.num_layers = max(layers) + 1

    # -- indexing -------------------------------------------------------------------
    def _index(self) -> None:
        p = self.path
        st_index, st_single = p / "model.safetensors.index.json", p / "model.safetensors"
        bin_index, bin_single = p / "pytorch_model.bin.index.json", p / "pytorch_model.bin"
        if st_index.is_file():
            files = self._files_from_index(st_index)
        elif st_single.is_file():
            files = [st_single]
        elif bin_index.is_file() or bin_single.is_file():
            if not self._allow_pickle:
                raise MergeSearchError(
                    f"{p}: holds only pickle .bin weights, which can run code when loaded; "
                    "convert them to safetensors, or pass --allow-pickle to load them "
                    "with torch.load(weights_only=True)"
                )
            files = self._files_from_index(bin_index) if bin_index.is_file() else [bin_single]
        else:
            raise MergeSearchError(f"{p}: no model.safetensors or model.safetensors.index.json found")
        for f in files:
            for name, meta in self._read_header(f).items():
                self.meta[name] = meta

    def _files_from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise MergeSearchError(f"{index}: not a valid index file ({e})") from e
        files = sorted({self.path / v for v in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise MergeSearchError(f"{index}: names shard {f.name}, which is missing")
        return files

    def _read_header(self, f: Path) -> dict[str, TensorMeta]:
        if f.suffix == ".bin":
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            self._pickled[f] = sd
            return {k: TensorMeta(tuple(v.shape), v.dtype, f) for k, v in sd.items()}
        # Parse the header ourselves: it is cheap and lets us check the file length, so a
        # truncated download is reported before any merging starts.
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size - 8:
                    raise ValueError("header longer than file")
                header = json.loads(fh.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise MergeSearchError(
                f"{f}: not a readable safetensors file ({e}); re-download or re-save it"
            ) from e
        header.pop("__metadata__", None)
        out = {}
        end = 0
        for name, h in header.items():
            if h.get("dtype") not in _ST_DTYPES:
                raise MergeSearchError(f"{f}: tensor {name} has unsupported dtype {h.get('dtype')}")
            begin, stop = h["data_offsets"]
            end = max(end, stop)
            out[name] = TensorMeta(tuple(h["shape"]), _ST_DTYPES[h["dtype"]], f, 8 + n + begin, stop - begin)
        if 8 + n + end > size:
            raise MergeSearchError(
                f"{f}: truncated ({size} bytes, header promises {8 + n + end}); re-download or re-save it"
            )
        return out

    @cached_property
    def by_layer(self) -> dict[int | None, list[str]]:
        """Tensor names grouped by layer index (None: outside the layers), in stored order."""
        out: dict[int | None, list[str]] = {}
        for name in self.meta:
            out.setdefault(self.arch.layer_of(name), []).append(name)
        return out

    # -- reading --------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.meta

    def resolve(self, name: str) -> str | None:
        """The stored name for `name`, following tied-embedding aliases."""
        if name in self.meta:
            return name
        for a, b in self.arch.tied:
            if name == a and b in self.meta:
                return b
            if name == b and a in self.meta:
                return a
        return None

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        stored = self.resolve(name)
        if stored is None:
            raise MergeSearchError(f"{self.path}: tensor {name} is missing from this model")
        meta = self.meta[stored]
        if meta.file in self._pickled:
            t = self._pickled[meta.file][stored]
        else:
            # Plain reads, not mmap: touched mmap pages count as resident memory until the
            # file is closed, and we promise memory bounded by tensors, not by models.
            fh = self._open.get(meta.file)
            if fh is None:
                fh = self._open[meta.file] = open(meta.file, "rb")
            buf = bytearray(meta.nbytes)
            fh.seek(meta.offset)
            if fh.readinto(buf) != meta.nbytes:
                raise MergeSearchError(f"{meta.file}: tensor {stored} is cut short; re-download the file")
            t = torch.frombuffer(buf, dtype=meta.dtype) if meta.nbytes else torch.empty(0, dtype=meta.dtype)
            t = t.reshape(meta.shape)
        return t.to(device)

    def close(self) -> None:
        for fh in self._open.values():
            fh.close()
        self._open.clear()
        self._pickled.clear()


def check_finite(t: torch.Tensor, name: str, where: Path) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise MergeSearchError(
            f"{where}: tensor {name} contains NaN or Inf; this checkpoint is damaged "
            "and merging it would spread the damage"
        )


def parse_size(text: str | int) -> int:
    """'5GB', '500M', '20K' or a plain number of bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().rstrip("B")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(s)
    except ValueError as e:
        raise MergeSearchError(f"shard size {text!r}: expected e.g. 5GB, 500MB or 20000") from e


@dataclass
class _Shard:
    names: list[str] = field(default_factory=list)
    nbytes: int = 0


class StreamingWriter:
    """Writes a sharded safetensors checkpoint tensor by tensor into a temporary folder.

    Output shapes and dtypes are known from the plan, so each shard's header is written
    first and tensor bytes are appended as they are produced: memory holds one tensor,
    not one shard. `commit()` renames the folder into place; `abort()` removes it.
    """

    def __init__(
        self,
        out_dir: Path,
        layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
        order: list[str],
        shard_bytes: int,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise MergeSearchError(f"{self.out_dir}: output folder exists; pass --overwrite to replace it")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        self.layout = layout
        self.shards: list[_Shard] = [_Shard()]
        for name in order:
            shape, dtype = layout[name]
            nbytes = _numel(shape) * _itemsize(dtype)
            cur = self.shards[-1]
            if cur.names and cur.nbytes + nbytes > shard_bytes:
                cur = _Shard()
                self.shards.append(cur)
            cur.names.append(name)
            cur.nbytes += nbytes
        n = len(self.shards)
        self.files = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._where = {name: i for i, shard in enumerate(self.shards) for name in shard.names}
        self._handles: dict[int, object] = {}
        self._pending: dict[int, list[str]] = {i: list(s.names) for i, s in enumerate(self.shards)}

    def _open_shard(self, i: int):
        if i in self._handles:
            return self._handles[i]
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in self.shards[i].names:
            shape, dtype = self.layout[name]
            nbytes = _numel(shape) * _itemsize(dtype)
            header[name] = {
                "dtype": _ST_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns data to 8 bytes
        fh = open(self.tmp / self.files[i], "wb")
        fh.write(struct.pack("<Q", len(raw)) + raw)
        self._handles[i] = fh
        return fh

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Tensors must arrive in each shard's order (the plan's order)."""
        i = self._where[name]
        if self._pending[i][0] != name:
            raise RuntimeError(f"write order: expected {self._pending[i][0]}, got {name}")
        shape, dtype = self.layout[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(f"{name}: planned {shape} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        fh = self._open_shard(i)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        fh.write(data.numpy().tobytes())
        self._pending[i].pop(0)
        if not self._pending[i]:
            fh.close()

    def add_file(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text)

    def copy_file(self, src: Path) -> None:
        shutil.copy2(src, self.tmp / src.name)

    def commit(self) -> Path:
        for fh in self._handles.values():
            fh.close()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {n: self.files[self._where[n]] for n in sorted(self._where)},
            }
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only; a model folder is not
        if self.out_dir.exists():
            old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
            os.rename(self.out_dir, old)
            os.rename(self.tmp, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        for fh in self._handles.values():
            try:
                fh.close()
            except OSError:  # a full disk fails the last flush too; the folder goes anyway
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def copy_tokenizer(src: Path, writer: StreamingWriter) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            writer.copy_file(f)
            copied.append(name)
    return copied
