"""The canonical model's tensors, the one source every exporter and every reference reads.

A transform (AWQ, SmoothQuant) changes fp tensors as well as codes: its scales are folded into the
RMSNorm gains (and v→o, up→down). An exporter that took norms, biases or embeddings from the
original checkpoint while packing the transformed codes would write a model that is neither the
original nor the canonical one (a GGUF built with AWQ that way scored KLD 0.096 vs 0.0021 for RTN).
So exporters never read the original state dict: they call ``canonical_fp_state``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch

from ..model import ModelInfo

Chooser = Callable[[str], "str | None"]  # module name → grid id it is exported with (None = kept fp)


class TensorStore(Mapping):
    """Tensors read on access (never all at once): the original checkpoint's safetensors files, with overrides on top.

    Values are loaded per access and not cached, so a consumer that handles one tensor at a time holds one tensor at a
    time — exporters and streamed forwards stay bounded by the largest tensor, not by the model.
    """

    def __init__(self, info: ModelInfo, overrides: Mapping[str, torch.Tensor] | None = None,
                 derived: Mapping[str, Callable[[], torch.Tensor]] | None = None):
        self.info = info
        self.overrides = overrides if overrides is not None else {}
        self.derived = dict(derived or {})  # name → loader, e.g. a dequantized grid (computed on access)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.derived:
            return self.derived[name]()
        if name in self.overrides:
            return self.overrides[name]
        t = self.info.tensors.get(name)
        if t is None:
            raise KeyError(name)
        from ..model.st_read import read_tensor

        return read_tensor(self.info.path / t.file, name)

    def __iter__(self) -> Iterator[str]:
        seen = set()
        for name in self.info.tensors:  # checkpoint order, then names only the overrides/derived carry
            seen.add(name)
            yield name
        for name in (*self.overrides, *self.derived):
            if name not in seen:
                seen.add(name)
                yield name

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: object) -> bool:
        return name in self.info.tensors or name in self.overrides or name in self.derived


def canonical_fp_state(info: ModelInfo, canonical) -> TensorStore:
    """The original tensors as stored (dtype kept), with the canonical (transformed) fp tensors on top — read lazily.

    ``canonical`` None (an unquantized export such as GGUF F16) gives the original tensors. Only names the original
    checkpoint has are taken from the canonical fp tensors.
    """
    fp = canonical.fp if canonical is not None else {}
    return TensorStore(info, _Restricted(fp, info.tensors))


class _Restricted(Mapping):
    def __init__(self, inner: Mapping, keys: Mapping):
        self.inner, self.keys_ = inner, keys

    def __getitem__(self, k):
        if k not in self.keys_:
            raise KeyError(k)
        return self.inner[k]

    def __iter__(self):
        return (k for k in self.inner if k in self.keys_)

    def __len__(self):
        return sum(1 for _ in self)

    def __contains__(self, k):
        return k in self.keys_ and k in self.inner


def canonical_weights(info: ModelInfo, canonical, choose: Chooser) -> TensorStore:
    """The weights a runtime loading the artifact must compute with: the canonical fp state, and each module's
    chosen grid dequantized, exactly, in fp32 (no packer involved). A tied lm_head's grid is the embedding's too.
    Read lazily: a dequantized grid is computed when its weight is asked for."""
    state = canonical_fp_state(info, canonical)
    derived: dict[str, Callable[[], torch.Tensor]] = {}
    for mod in (canonical.quant if canonical is not None else ()):
        gid = choose(mod)
        if gid is None:
            continue
        keys = [f"{mod}.weight"]
        if info.tied_embeddings and mod in ("lm_head", "model.embed_tokens"):
            keys = [k for k in ("model.embed_tokens.weight", "lm_head.weight") if k in state] or keys
        for key in keys:
            ti = info.tensors.get(key)

            def load(mod=mod, gid=gid, shape=ti.shape if ti is not None else None) -> torch.Tensor:
                w = torch.from_numpy(np.ascontiguousarray(canonical.quant[mod][gid].dequantize()))
                return w.reshape(shape) if shape is not None else w  # fp32: the stored dtype would round it

            derived[key] = load
    state.derived.update(derived)
    return state


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model`` in place, in the model's dtypes (keys the model lacks are ignored)."""
    sd = model.state_dict()
    for k in state:
        if k in sd:
            sd[k] = state[k].to(sd[k].dtype).reshape(sd[k].shape)
    model.load_state_dict(sd, strict=True)
