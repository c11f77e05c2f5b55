"""CanonicalModel on disk: one safetensors file + one JSON, in a content-addressed cache.

Tensor names: ``q/<module>/<grid id>/<field>`` for codes and grid parameters, ``fp/<name>`` for
transformed fp tensors, ``imatrix/<module>`` for the importance vectors. The cache key hashes
the model's weights sha256, the calibration set's sha256, the recipe, the chain recipe and the
pass settings — anything that can change a code. Directories are written under a temp name and
renamed, so a crashed run never leaves a half-written result that a later run would trust.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import ArtifactError
from .grids import QuantizedTensor
from .stage import CanonicalModel, Recipe

TENSORS = "canonical.safetensors"
META = "canonical.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("QUANTPRISM_CACHE", Path.home() / ".cache" / "quantprism")) / "canonical"


def cache_key(model_sha: str, calib_sha: str, recipe: Recipe, chain: Recipe, sequential: bool, sample_tokens: int) -> str:
    blob = json.dumps({
        "v": __version__, "model": model_sha, "calib": calib_sha, "recipe": recipe.key(), "chain": chain.key(),
        "sequential": sequential, "sample_tokens": sample_tokens,
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


def save(res: CanonicalModel, dest: Path, provenance: dict) -> Path:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save_file(to_tensors(res), str(tmp / TENSORS), metadata={"format": "quantprism-canonical"})
        meta = {"recipe": res.recipe.__dict__ | {"grids": list(res.recipe.grids)}, "info": res.info,
                "provenance": provenance, "quantprism": __version__}
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=list) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load(path: Path) -> tuple[CanonicalModel, dict]:
    path = Path(path)
    if not (path / TENSORS).is_file() or not (path / META).is_file():
        raise ArtifactError(f"{path}: not a canonical result (needs {TENSORS} and {META}); run `quantprism quantize`")
    try:
        meta = json.loads((path / META).read_text())
        tensors = load_file(str(path / TENSORS))
    except Exception as e:  # corrupt JSON or safetensors: one actionable line
        raise ArtifactError(f"{path}: corrupt canonical result ({type(e).__name__}); delete it and re-run") from None
    r = meta["recipe"]
    recipe = Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
    return from_tensors(recipe, tensors, meta["info"]), meta.get("provenance", {})


class LayerCheckpoint:
    """Implements stage.Checkpoint: ``layer_NNN.safetensors`` per finished layer plus the latest stream.

    Files are written atomically; a partial layer (killed mid-write) is simply not there, so the
    pass redoes that layer. The directory is removed once the final results are saved.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def _layer(self, li: int) -> Path:
        return self.root / f"layer_{li:03d}.safetensors"

    def save(self, layer: int, results: list[CanonicalModel], hs: list[torch.Tensor]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        prefix = f"model.layers.{layer}."
        tensors: dict[str, torch.Tensor] = {}
        for ri, res in enumerate(results):
            part = CanonicalModel(res.recipe)
            part.quant = {m: g for m, g in res.quant.items() if m.startswith(prefix)}
            part.fp = {k: v for k, v in res.fp.items() if k.startswith(prefix)}
            part.imatrix = {k: v for k, v in res.imatrix.items() if k.startswith(prefix)}
            for k, v in to_tensors(part).items():
                tensors[f"r{ri}|{k}"] = v
        infos = json.dumps([res.info["layers"][-1] for res in results])
        _save_atomic(tensors, self._layer(layer), {"infos": infos})
        _save_atomic({f"h{i}": h.contiguous() for i, h in enumerate(hs)}, self.root / "stream.safetensors",
                     {"layer": str(layer)})

    def load(self, recipes: list[Recipe]) -> tuple[int, list[CanonicalModel], list[torch.Tensor]] | None:
        stream = self.root / "stream.safetensors"
        if not stream.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(stream), "pt") as f:
            done = int(f.metadata()["layer"])
            hs = [f.get_tensor(f"h{i}") for i in range(len(list(f.keys())))]
        if not all(self._layer(li).is_file() for li in range(done + 1)):
            return None
        results = [CanonicalModel(r, info={"layers": []}) for r in recipes]
        for li in range(done + 1):
            with safe_open(str(self._layer(li)), "pt") as f:
                infos = json.loads(f.metadata()["infos"])
                per: dict[int, dict[str, torch.Tensor]] = {}
                for key in f.keys():
                    ri, name = key.split("|", 1)
                    per.setdefault(int(ri[1:]), {})[name] = f.get_tensor(key)
            for ri, res in enumerate(results):
                part = from_tensors(res.recipe, per.get(ri, {}), {})
                res.quant.update(part.quant)
                res.fp.update(part.fp)
                res.imatrix.update(part.imatrix)
                res.info["layers"].append(infos[ri])
        return done, results, hs

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _save_atomic(tensors: dict[str, torch.Tensor], dest: Path, metadata: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
