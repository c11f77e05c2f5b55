"""Reading safetensors files tensor by tensor with plain positioned reads (no mmap).

A memory-mapped read leaves every touched page of the checkpoint resident in the process (RssFile) for as long as
the mapping lives; reading with ``os.pread`` into a fresh buffer keeps the process at the size of the tensors it
holds, which is what lets the streamed pass stay bounded on models larger than RAM.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import ModelError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


@dataclass(frozen=True)
class Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def read_index(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """{name: Entry} and the header's metadata, from the header alone."""
    return _index(str(path), os.stat(path).st_mtime_ns)


@lru_cache(maxsize=256)
def _index(path: str, _mtime: int) -> tuple[dict[str, Entry], dict[str, str]]:
    from .loader import _read_safetensors_header  # the one header parser (bounds and truncation checks)

    header = dict(_read_safetensors_header(Path(path)))
    meta = header.pop("__metadata__", None) or {}
    with open(path, "rb") as f:
        base = 8 + struct.unpack("<Q", f.read(8))[0]
    return {k: Entry(v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items()}, meta


def read_tensor(path: Path, name: str) -> torch.Tensor:
    entries, _ = read_index(path)
    e = entries.get(name)
    if e is None:
        raise KeyError(name)
    if e.dtype not in DTYPES:
        raise ModelError(f"{path}: tensor {name} has dtype {e.dtype}, which quantprism does not read")
    buf = bytearray(e.end - e.begin)
    fd = os.open(path, os.O_RDONLY)
    try:
        view, got = memoryview(buf), 0
        while got < len(buf):
            k = os.preadv(fd, [view[got:]], e.begin + got)
            if k <= 0:
                raise ModelError(f"{path}: truncated while reading {name}")
            got += k
    finally:
        os.close(fd)
    if not buf:
        return torch.empty(e.shape, dtype=DTYPES[e.dtype])
    return torch.frombuffer(buf, dtype=DTYPES[e.dtype]).reshape(e.shape)
