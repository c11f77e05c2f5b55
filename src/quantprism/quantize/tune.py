"""Block-wise output reconstruction: tune the group scales of a decoder layer's solved int codes so that the quantized
layer's output on the quantized model's inputs matches the fp layer's output on the fp inputs.

GPTQ (and the scale refit) minimise each linear's own output error; the layer's output also goes through attention
softmax, the gated MLP and the residual stream, where errors of different linears meet. A short Adam run on a
multiplicative scale correction per group, starting from the GPTQ solution (codes fixed), fits that: a few epochs
over the calibration batches, the gradient of ‖layer_q(X̃) − layer_fp(X)‖² flowing through the real layer forward.
Codes and zero points are kept (the exporters' integer layouts are unchanged); the tuned scales are rounded to the
grid's scale dtype, and the tuning is kept only if it lowered the loss over the whole calibration set.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch.func import functional_call

from .grids import IntGrid, QuantizedTensor, _round_scale

log = logging.getLogger("quantprism")


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) float32 copy: tensors made under inference_mode cannot enter an autograd graph."""
    with torch.inference_mode(False):
        return t.detach().clone().float() if t.is_floating_point() else t.detach().clone()


def _plain_kw(kw: dict) -> dict:
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            out[k] = _plain(v)
        elif isinstance(v, tuple) and all(isinstance(x, torch.Tensor) for x in v):
            out[k] = tuple(_plain(x) for x in v)
        else:
            out[k] = v
    return out


def tune_layer_scales(layer: torch.nn.Module, quant: dict[str, QuantizedTensor], inputs, targets,
                      kws: list[dict], epochs: int = 1, lr: float = 1e-3) -> tuple[dict[str, QuantizedTensor], dict]:
    """``quant``: {linear name inside the layer: its solved int-grid result}; ``inputs``/``targets``: the quantized
    model's layer inputs and the fp model's layer outputs, batch by batch. Returns the results with tuned scales (or
    the given ones when tuning did not help) and a record (loss before/after)."""
    lins = {n: q for n, q in quant.items() if isinstance(q.grid, IntGrid)}
    if not lins or epochs <= 0:
        return quant, {}
    with torch.inference_mode(False), torch.enable_grad():
        base = {k: _plain(v) for k, v in layer.state_dict().items()}
        fixed, s0, theta, gcs = {}, {}, {}, {}
        for n, q in lins.items():
            K = q.codes.shape[1]
            gcs[n] = q.grid.group_cols(K)
            fixed[n] = torch.from_numpy(q.codes.astype(np.float32)) - torch.from_numpy(
                q.params["zero"].astype(np.float32)).repeat_interleave(gcs[n], 1)
            s0[n] = torch.from_numpy(q.params["scale"].astype(np.float32))
            theta[n] = torch.zeros_like(s0[n], requires_grad=True)
        kws_p = [_plain_kw(kw) for kw in kws]

        def weights(scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            p = dict(base)
            for n in lins:
                p[f"{n}.weight"] = scales[n].repeat_interleave(gcs[n], 1) * fixed[n]
            return p

        def out_of(params, h, kw):
            r = functional_call(layer, params, (h,), kw)
            return r[0] if isinstance(r, tuple) else r

        def full_loss(scales) -> float:
            with torch.no_grad():
                p = weights(scales)
                tot = 0.0
                for h, y, kw in zip(inputs, targets, kws_p, strict=True):
                    tot += float(((out_of(p, _plain(h), kw) - _plain(y)) ** 2).mean())
                return tot

        before = full_loss(s0)
        opt = torch.optim.Adam(list(theta.values()), lr=lr)
        for _ in range(epochs):
            for h, y, kw in zip(inputs, targets, kws_p, strict=True):
                opt.zero_grad(set_to_none=True)
                p = weights({n: s0[n] * (1 + theta[n]) for n in lins})
                loss = ((out_of(p, _plain(h), kw) - _plain(y)) ** 2).mean()
                loss.backward()
                opt.step()
        tuned = {}
        for n, q in lins.items():
            s = _round_scale((s0[n] * (1 + theta[n].detach())).float(), q.grid.scale_dtype)
            tuned[n] = torch.where(torch.isfinite(s) & (s > 0), s, s0[n])
        after = full_loss(tuned)
    rec = {"loss_before": before, "loss_after": after, "epochs": epochs, "lr": lr, "kept": after < before}
    if after >= before:
        return quant, rec
    out = dict(quant)
    for n, q in lins.items():
        t = QuantizedTensor(q.grid_id, q.codes, dict(q.params))
        t.params["scale"] = tuned[n].numpy().astype(q.params["scale"].dtype)
        out[n] = t
    return out, rec
