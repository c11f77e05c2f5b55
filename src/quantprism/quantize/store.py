"""CanonicalModel on disk: one safetensors file + one JSON, in a content-addressed cache.

Tensor names: ``q/<module>/<grid id>/<field>`` for codes and grid parameters, ``fp/<name>`` for
transformed fp tensors, ``imatrix/<module>`` for the importance vectors. A streamed pass writes one file per decoder
layer (hard-linked from its checkpoint) plus ``head.safetensors``; ``canonical.json`` lists the files. Loading is lazy:
a tensor is read when asked for, so exporters hold one module at a time. The cache key hashes
the model's weights sha256, the calibration set's sha256, the recipe, the chain recipe and the
pass settings — anything that can change a code. Directories are written under a temp name and
renamed, so a crashed run never leaves a half-written result that a later run would trust.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import ArtifactError
from ..manifest import atomic_path, write_text_atomic
from ..model.st_read import read_index, read_tensor
from .grids import QuantizedTensor
from .stage import CanonicalModel, Recipe

log = logging.getLogger(__name__)

TENSORS = "canonical.safetensors"  # the whole result in one file (an in-memory pass)
HEAD = "head.safetensors"  # a streamed pass: what is not in the per-layer files (lm_head, embeddings)
META = "canonical.json"


# bumped when the arithmetic behind the codes changes (2: in-place inverse-Hessian factor, column-blocked XᵀX;
# 3: XᵀX and the factor's updates on the upper triangle only; 4: tuning keeps or drops on 8 batches, GGML grids
# tuned as deployed, only the chain's first set learns from quantized inputs)
SOLVER_VERSION = 4


def default_cache_dir() -> Path:
    return Path(os.environ.get("QUANTPRISM_CACHE", Path.home() / ".cache" / "quantprism")) / "canonical"


def cache_key(model_sha: str, calib_sha: str, recipe: Recipe, chain: Recipe, sequential: bool, sample_tokens: int,
              activations: str = "float32", batch: int = 8) -> str:
    """``activations``: the dtype the hidden states are kept in between layers; ``batch``: windows per forward (both
    move codes, so both are keyed)."""
    blob = json.dumps({
        "v": __version__, "solver": SOLVER_VERSION, "model": model_sha, "calib": calib_sha, "recipe": recipe.key(), "chain": chain.key(),
        "sequential": sequential, "sample_tokens": sample_tokens, "activations": activations, "batch": batch,
    }, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def sha_of(items: list[str]) -> str:
    return hashlib.sha256("|".join(items).encode()).hexdigest()[:24]


def to_tensors(res: CanonicalModel) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for mod, grids in res.quant.items():
        for gid, qt in grids.items():
            out[f"q/{mod}/{gid}/codes"] = torch.from_numpy(np.ascontiguousarray(qt.codes))
            for k, v in qt.params.items():
                out[f"q/{mod}/{gid}/{k}"] = torch.from_numpy(np.ascontiguousarray(v))
    for name, t in res.fp.items():
        out[f"fp/{name}"] = t.contiguous()
    for mod, t in res.imatrix.items():
        out[f"imatrix/{mod}"] = t.contiguous()
    return out


def from_tensors(recipe: Recipe, tensors: dict[str, torch.Tensor], info: dict) -> CanonicalModel:
    res = CanonicalModel(recipe, info=info)
    for key, t in tensors.items():
        kind, rest = key.split("/", 1)
        if kind == "fp":
            res.fp[rest] = t
        elif kind == "imatrix":
            res.imatrix[rest] = t
        elif kind == "q":
            mod, gid, fld = rest.rsplit("/", 2)
            qt = res.quant.setdefault(mod, {}).setdefault(gid, QuantizedTensor(gid, np.zeros(0, np.uint8)))
            if fld == "codes":
                qt.codes = t.numpy()
            else:
                qt.params[fld] = t.numpy()
    return res


def save(res: CanonicalModel, dest: Path, provenance: dict, layer_files: list[Path] | None = None) -> Path:
    """Write ``res`` to ``dest`` atomically. ``layer_files``: per-layer safetensors already on disk (a streamed pass's
    checkpoint) that hold the layers ``res`` no longer has in memory; they are hard-linked in, never re-read."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        files = []
        for i, f in enumerate(layer_files or []):
            name = f"layer_{i:03d}.safetensors"
            _link_or_copy(Path(f), tmp / name)
            files.append(name)
        if layer_files is None:
            save_file(to_tensors(res), str(tmp / TENSORS), metadata={"format": "quantprism-canonical"})
            files.append(TENSORS)
        else:
            save_file(to_tensors(res), str(tmp / HEAD), metadata={"format": "quantprism-canonical"})
            files.append(HEAD)
        meta = {"recipe": res.recipe.__dict__ | {"grids": list(res.recipe.grids)}, "info": res.info,
                "provenance": provenance, "quantprism": __version__, "files": files}
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=list) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


@contextlib.contextmanager
def cache_lock(cache_dir: Path):
    """One canonical pass at a time per cache folder (an exclusive ``flock`` on ``cache_dir/.lock``): two builds
    sharing a cache wait for each other, and the second finds the first's results instead of racing it on the same
    partial checkpoint and result folders. Released when the process exits, however it exits."""
    import fcntl

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another quantprism run that holds the canonical cache %s", cache_dir)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_info(path: Path, info: dict) -> None:
    """Rewrite a stored result's ``info`` (e.g. measured sensitivity added after the pass), atomically."""
    meta = json.loads((Path(path) / META).read_text())
    meta["info"] = info
    write_text_atomic(Path(path) / META, json.dumps(meta, indent=2, sort_keys=True, default=list) + "\n")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copyfile(src, dst)


def is_complete(path: Path) -> bool:
    """A finished result: its JSON and every file the JSON lists."""
    path = Path(path)
    if not (path / META).is_file():
        return False
    try:
        files = json.loads((path / META).read_text()).get("files") or [TENSORS]
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return all((path / f).is_file() for f in files)


def load(path: Path) -> tuple[CanonicalModel, dict]:
    """The result at ``path``, read lazily: tensors and codes are read from disk when accessed, not kept."""
    path = Path(path)
    if not (path / META).is_file():
        raise ArtifactError(f"{path}: not a canonical result (needs {META} and the files it lists); run `quantprism quantize`")
    try:
        meta = json.loads((path / META).read_text())
        missing = [f for f in meta.get("files") or [TENSORS] if not (path / f).is_file()]
        if missing:
            raise ArtifactError(f"{path}: incomplete canonical result ({missing[0]} is missing); delete it and re-run")
        index = {}
        for f in meta.get("files") or [TENSORS]:
            entries, _ = read_index(path / f)
            index.update({k: path / f for k in entries})
    except ArtifactError:
        raise
    except Exception as e:  # corrupt JSON or safetensors: one actionable line
        raise ArtifactError(f"{path}: corrupt canonical result ({type(e).__name__}); delete it and re-run") from None
    r = meta["recipe"]
    recipe = Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
    res = CanonicalModel(recipe, info=meta["info"])
    fp, imat, quant = {}, {}, {}
    for key, f in index.items():
        kind, rest = key.split("/", 1)
        if kind == "fp":
            fp[rest] = (f, key)
        elif kind == "imatrix":
            imat[rest] = (f, key)
        elif kind == "q":
            mod, gid, fld = rest.rsplit("/", 2)
            quant.setdefault(mod, {}).setdefault(gid, {})[fld] = (f, key)
    def grids_of(grids: dict) -> _Lazy:
        return _Lazy({gid: (gid, fields) for gid, fields in grids.items()}, lambda gf: _read_quantized(*gf))

    res.fp, res.imatrix = _Lazy(fp, lambda fk: read_tensor(*fk)), _Lazy(imat, lambda fk: read_tensor(*fk))  # type: ignore[assignment]
    res.quant = _Lazy(quant, grids_of)  # type: ignore[assignment]
    return res, meta.get("provenance", {})


class _Lazy(Mapping):
    """A read-only mapping whose values are read from disk on access (``read(where[key])``), never kept."""

    def __init__(self, where: dict, read: Callable):
        self.where, self.read = where, read

    def __getitem__(self, key: str):
        return self.read(self.where[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, key: object) -> bool:
        return key in self.where


def _read_quantized(gid: str, fields: dict[str, tuple[Path, str]]) -> QuantizedTensor:
    qt = QuantizedTensor(gid, read_tensor(*fields["codes"]).numpy())
    qt.params = {k: read_tensor(*v).numpy() for k, v in fields.items() if k != "codes"}
    return qt


class LayerCheckpoint:
    """Implements stage.Checkpoint: ``layer_NNN.rR.safetensors`` per finished layer and recipe, plus the latest
    activations (``stream-NNN.bin`` + ``.json``).

    Files are written atomically (the JSON of a stream last); a partial layer (killed mid-write) is simply not there,
    so the pass redoes that layer. With ``offload`` the finished layers stay on disk only: a resumed pass does not read
    them back, and the final results hard-link them. The directory is removed once the final results are saved.
    """

    def __init__(self, root: Path, offload: bool = False):
        self.root = Path(root)
        self.offload = offload

    def layer_file(self, li: int, ri: int) -> Path:
        return self.root / f"layer_{li:03d}.r{ri}.safetensors"

    def save(self, layer: int, results: list[CanonicalModel], hs) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        prefix = f"model.layers.{layer}."
        for ri, res in enumerate(results):
            part = CanonicalModel(res.recipe)
            part.quant = {m: g for m, g in res.quant.items() if m.startswith(prefix)}
            part.fp = {k: v for k, v in res.fp.items() if k.startswith(prefix)}
            part.imatrix = {k: v for k, v in res.imatrix.items() if k.startswith(prefix)}
            _save_atomic(to_tensors(part), self.layer_file(layer, ri), {"info": json.dumps(res.info["layers"][-1])})
        self._save_stream(layer, hs)

    def _save_stream(self, layer: int, hs) -> None:
        shapes, dtype = [], None
        with atomic_path(self.root / f"stream-{layer:03d}.bin") as tmp, open(tmp, "wb") as f:
            for h in hs:  # one batch at a time (activations may live on disk)
                h = h.contiguous()
                dtype = str(h.dtype).removeprefix("torch.")
                shapes.append(list(h.shape))
                f.write(h.view(-1).view(torch.uint8).numpy().tobytes())
        write_text_atomic(self.root / f"stream-{layer:03d}.json", json.dumps({"dtype": dtype, "shapes": shapes}))
        for old in self.root.glob("stream-*.*"):
            if not old.name.startswith(f"stream-{layer:03d}."):
                old.unlink(missing_ok=True)

    def load(self, recipes: list[Recipe]) -> tuple[int, list[CanonicalModel], Iterator[torch.Tensor]] | None:
        streams = sorted(self.root.glob("stream-*.json")) if self.root.is_dir() else []
        streams = [s for s in streams if s.with_suffix(".bin").is_file()]
        if not streams:
            return None
        done = int(streams[-1].stem.split("-")[1])
        if not all(self.layer_file(li, ri).is_file() for li in range(done + 1) for ri in range(len(recipes))):
            return None
        results = [CanonicalModel(r, info={"layers": []}) for r in recipes]
        for li in range(done + 1):
            for ri, res in enumerate(results):
                f = self.layer_file(li, ri)
                _, meta = read_index(f)
                res.info["layers"].append(json.loads(meta["info"]))
                if not self.offload:
                    part = from_tensors(res.recipe, load_file(str(f)), {})
                    res.quant.update(part.quant)
                    res.fp.update(part.fp)
                    res.imatrix.update(part.imatrix)
        return done, results, self._read_stream(streams[-1])

    def _read_stream(self, meta_path: Path) -> Iterator[torch.Tensor]:
        meta = json.loads(meta_path.read_text())
        dtype = getattr(torch, meta["dtype"])
        size = torch.empty((), dtype=dtype).element_size()
        off = 0
        with open(meta_path.with_suffix(".bin"), "rb") as f:
            for shape in meta["shapes"]:
                n = size * int(np.prod(shape))
                f.seek(off)
                buf = bytearray(f.read(n))
                off += n
                yield torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def layer_files(self, ri: int, n_layers: int) -> list[Path]:
        return [self.layer_file(li, ri) for li in range(n_layers)]

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _save_atomic(tensors: dict[str, torch.Tensor], dest: Path, metadata: dict[str, str]) -> None:
    with atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
