"""Safetensors files written tensor by tensor: memory bounded by the largest tensor, not by the checkpoint.

``ShardWriter.add(name, tensor)`` appends the tensor's bytes to a temporary data file of the current shard (one per
element size) and records its dtype, shape and offsets; the tensor can be dropped right after. A shard is finalized
when the next tensor would take it past ``shard_bytes`` (a tensor larger than that gets a shard of its own): the
8-byte little-endian header length, the JSON header (``__metadata__`` first, padded with spaces to a multiple of 8)
and the data are written to a temp file, renamed to a provisional name. ``close`` names the shards once their count
is known — ``model.safetensors`` alone, or ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``
(``metadata.total_size``, ``weight_map``) as Hugging Face writes them.

Layout: within a shard the data is grouped by element size, largest first (8, 4, 2, 1 bytes), each group in arrival
order — safetensors' own order, so every tensor starts at an offset aligned to its element size (the header is
padded to 8) and loaders that map the file can view it in place. The same tensors in the same order give
byte-identical files. An exception (or ``abort``) removes every file the writer made.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import ArtifactError

DEFAULT_SHARD_BYTES = 5_000_000_000  # as transformers' save_pretrained (max_shard_size="5GB")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                     ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):  # newer torch only
        ST_DTYPES[getattr(torch, _name)] = _code

_COPY_CHUNK = 16 << 20


def tensor_bytes(t: torch.Tensor | np.ndarray) -> tuple[str, list[int], np.ndarray, int]:
    """(safetensors dtype, shape, the data as a flat uint8 array, element size) — the data is a view of ``t`` when it
    is contiguous on the CPU, so no copy of the tensor is made; 0-dim and empty tensors included."""
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    if not isinstance(t, torch.Tensor):
        raise ArtifactError(f"expected a torch tensor or numpy array, got {type(t).__name__}")
    if t.dtype not in ST_DTYPES:
        raise ArtifactError(f"safetensors cannot store dtype {t.dtype}")
    t = t.detach().cpu().contiguous()
    shape = [int(d) for d in t.shape]
    if t.numel() == 0:
        return ST_DTYPES[t.dtype], shape, np.empty(0, dtype=np.uint8), t.element_size()
    return ST_DTYPES[t.dtype], shape, t.reshape(-1).view(torch.uint8).numpy(), t.element_size()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _append_file(dst: BinaryIO, src_path: Path) -> None:
    """Copy ``src_path`` onto the end of ``dst`` in the kernel where it can (no user-space buffer)."""
    dst.flush()
    with open(src_path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        done = 0
        if hasattr(os, "sendfile"):
            try:
                while done < size:
                    n = os.sendfile(dst.fileno(), src.fileno(), done, size - done)
                    if n == 0:
                        break
                    done += n
            except OSError:
                pass
        if done < size:  # no sendfile here (or it stopped early): plain buffered copy of the rest
            src.seek(done)
            dst.seek(0, os.SEEK_END)
            shutil.copyfileobj(src, dst, _COPY_CHUNK)


@dataclass
class _Shard:
    index: int
    groups: dict[int, tuple[Path, BinaryIO]] = field(default_factory=dict)  # element size → (data file, handle)
    entries: list[tuple[str, str, list[int], int, int]] = field(default_factory=list)  # name, dtype, shape, size, nbytes
    nbytes: int = 0


class ShardWriter:
    """Write safetensors shards into ``root`` one tensor at a time (see the module docstring)."""

    def __init__(self, root: Path, shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: Mapping[str, str] | None = None,
                 single_name: str = SINGLE_FILE, index_name: str = INDEX_FILE):
        if sys.byteorder != "little":
            raise ArtifactError("the safetensors writer needs a little-endian machine")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = int(shard_bytes)
        self.metadata = {str(k): str(v) for k, v in (metadata if metadata is not None else {"format": "pt"}).items()}
        self.single_name, self.index_name = single_name, index_name
        stem = single_name.removesuffix(".safetensors")
        self._stem = stem
        self._work = Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=".parts", dir=self.root))
        self._shard: _Shard | None = None
        self._done: list[tuple[Path, list[str]]] = []  # finalized shards: provisional path, tensor names
        self._names: set[str] = set()
        self._placed: list[Path] = []  # files moved into root by close (removed again by abort)
        self.total_size = 0
        self.files: list[str] | None = None

    # -- adding
    def add(self, name: str, tensor: torch.Tensor | np.ndarray) -> int:
        """Append one tensor; returns its size in bytes. The caller may drop ``tensor`` afterwards."""
        if self.files is not None:
            raise ArtifactError("safetensors writer already closed")
        if not isinstance(name, str) or not name:
            raise ArtifactError(f"tensor name must be a non-empty string, got {name!r}")
        if name in self._names:
            raise ArtifactError(f"tensor {name!r} written twice")
        dtype, shape, data, size = tensor_bytes(tensor)
        nbytes = int(data.nbytes)
        shard = self._shard
        if shard is not None and shard.entries and shard.nbytes + nbytes > self.shard_bytes:
            self._finalize(shard)
            shard = None
        if shard is None:
            shard = self._shard = _Shard(len(self._done) + 1)
        if size not in shard.groups:
            path = self._work / f"shard-{shard.index:05d}.e{size}.data"
            shard.groups[size] = (path, open(path, "wb"))  # noqa: SIM115 (closed in _finalize / abort)
        if nbytes:
            shard.groups[size][1].write(memoryview(data))
        shard.entries.append((name, dtype, shape, size, nbytes))
        shard.nbytes += nbytes
        self._names.add(name)
        self.total_size += nbytes
        return nbytes

    def _finalize(self, shard: _Shard) -> None:
        for _, f in shard.groups.values():
            f.close()
        header: dict[str, Any] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        order = sorted(shard.groups, reverse=True)  # element size, largest first: every tensor aligned
        for size in order:
            for name, dtype, shape, s, nbytes in shard.entries:
                if s == size:
                    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
                    offset += nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        tmp = self._work / f"shard-{shard.index:05d}.safetensors.tmp"
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for size in order:
                _append_file(out, shard.groups[size][0])
            out.flush()
            if out.tell() != 8 + len(raw) + offset:
                raise ArtifactError(f"short write of {tmp.name}: {out.tell()} bytes, expected {8 + len(raw) + offset}")
        for path, _ in shard.groups.values():
            path.unlink()
        done = self._work / f"shard-{shard.index:05d}.safetensors"
        os.replace(tmp, done)
        self._done.append((done, [e[0] for e in shard.entries]))
        self._shard = None

    # -- ending
    def close(self) -> list[str]:
        """Finalize the last shard, give the shards their names (and write the index when there are several);
        returns the shard file names (the index not included)."""
        if self.files is not None:
            return self.files
        try:
            if self._shard is not None or not self._done:
                self._finalize(self._shard or _Shard(1))  # no tensor at all: one empty file, as save_file({}) writes
            n = len(self._done)
            names = [self.single_name] if n == 1 else [f"{self._stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            for (path, _), name in zip(self._done, names, strict=True):
                os.replace(path, self.root / name)
                self._placed.append(self.root / name)
            if n > 1:
                self._placed.append(self.root / self.index_name)
                _write_json(self.root / self.index_name, {
                    "metadata": {"total_size": self.total_size},
                    "weight_map": {t: name for (_, ts), name in zip(self._done, names, strict=True) for t in ts},
                })
        except BaseException:
            self.abort()
            raise
        shutil.rmtree(self._work, ignore_errors=True)
        self.files = names
        return names

    def abort(self) -> None:
        """Remove everything this writer made (temp data, finalized shards, renamed ones); no-op once closed."""
        if self.files is not None:
            return
        if self._shard is not None:
            for _, f in self._shard.groups.values():
                f.close()
            self._shard = None
        shutil.rmtree(self._work, ignore_errors=True)
        for p in self._placed:
            p.unlink(missing_ok=True)
        self._placed = []
        self.files = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def iter_tensors(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> Iterable[tuple[str, Any]]:
    """(name, tensor) pairs, one value at a time: a Mapping in sorted-name order (its values read on access — a lazy
    store stays lazy), any other iterable in its own order."""
    if isinstance(tensors, Mapping):
        return ((name, tensors[name]) for name in sorted(tensors))
    return tensors


def write_stream(root: Path, tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
                 shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: Mapping[str, str] | None = None,
                 on_tensor: Callable[[str, int], None] | None = None) -> list[str]:
    """Write ``tensors`` into ``root`` as safetensors shards, one tensor in memory at a time; returns the files.
    ``on_tensor(name, nbytes)`` is called after each tensor is written (progress)."""
    with ShardWriter(root, shard_bytes, metadata) as w:
        for name, t in iter_tensors(tensors):
            n = w.add(name, t)
            del t
            if on_tensor is not None:
                on_tensor(name, n)
    assert w.files is not None
    return w.files
