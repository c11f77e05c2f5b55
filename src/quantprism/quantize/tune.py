"""Block-wise output reconstruction: tune the block parameters (and optionally the rounding) of a decoder layer's
solved codes so that the quantized layer's output on the quantized model's inputs matches the fp layer's output on
the fp inputs.

GPTQ (and the scale refit) minimise each linear's own output error; the layer's output also goes through attention
softmax, the gated MLP and the residual stream, where errors of different linears meet. A short Adam run on
corrections of the block parameters, starting from the GPTQ solution, fits that: a few epochs over the calibration
batches, the gradient of ‖layer_q(X̃) − layer_fp(X)‖² flowing through the real layer forward. The exporters' layouts
are unchanged: continuous parameters (int-grid scales, GGML's fp16 ``d``/``dmin``/``m``) take a multiplicative
correction and are rounded to their storage dtype; the integer sub-block scales and mins of k-quants (6-bit, Q6_K's
int8) take an additive correction through a straight-through round and stay in their range. The tuning is kept only
if it lowered the loss (on CHECK_BATCHES evenly spaced calibration batches) with every parameter as stored.

Learned rounding (``cont``, SignRound-like, started from GPTQ instead of from round-to-nearest): GPTQ rounds each
error-updated weight u to its nearest grid point; an offset V ∈ [−½, ½] per weight, learned through a straight-through
round (code = clamp(round(u + V) + zero)), lets the layer loss choose the other grid point where that pays. V = 0 is
GPTQ's solution exactly; small Adam steps flip only weights near a rounding boundary. Measured on SmolLM2-135M's first
4 layers (W4 g64): AutoRound's signed descent with travel ½ flipped ~7 % of the codes on single batches' noise and
raised the loss over scale tuning alone; travel 0.1 lowered it 14 %, Adam (ROUND_LR) 16 %.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch.func import functional_call

from .grids import LAYOUTS, IntGrid, KQuantGrid, QuantizedTensor, _round_scale

log = logging.getLogger("quantprism")

# Peak Adam steps (× the recipe's ``tune_lr``); every one falls linearly to 0 over the run (as AutoRound's), so the
# last steps settle. The best peak depends on the run: SmolLM2-135M's first 3 layers (W4 g64 sym, 4 epochs × 32 steps
# with learned rounding) reach a third-layer loss of 0.2705 with these steps constant, 0.2725 decaying from them,
# 0.2440 / 0.2328 / 0.2383 decaying from 2× / 3× / 5×; the bundled model (2 epochs × 8 steps) loses at 2× and 3×
# (the tuning is dropped in most layers) and gains at 1×.
SCALE_LR = 1e-3  # multiplicative corrections of continuous parameters (≈ 3 % over an epoch of 32 steps)
INT_LR = 0.03  # integer sub-block corrections (k-quants), in integer units (≈ 1 level over an epoch of 32 steps)
CHECK_BATCHES = 8  # batches the keep-or-drop loss is measured on (evenly spaced): a full pass cost a third of an epoch
ROUND_LR = 0.002  # rounding offsets, in code units (≈ 0.06 of a level over an epoch of 32 steps)
TUNED_GGML = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1")  # IQ4 levels are not tuned


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


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).astype(np.float32))


def tunable(grid) -> bool:
    return isinstance(grid, IntGrid) or (isinstance(grid, KQuantGrid) and grid.type in TUNED_GGML)


class _Linear:
    """One linear's solved result as a differentiable function of its parameter corrections:
    w = S·(C − Z) − M per column, S and M the effective scale and min of the column's sub-block (M = 0 for
    symmetric layouts), C the codes (fixed, or rounded from ``u`` + learned offsets), Z the zero point / offset."""

    def __init__(self, q: QuantizedTensor, u: torch.Tensor | None):
        self.q, g, p = q, q.grid, q.params
        N, K = q.codes.shape
        self.codes = _t(q.codes)
        self.rel: dict[str, torch.Tensor] = {}  # multiplicative corrections of continuous parameters
        self.int: dict[str, torch.Tensor] = {}  # additive corrections of integer sub-block parameters
        if isinstance(g, IntGrid):
            self.kind, self.sub, (self.lo, self.hi) = "int", g.group_cols(K), g._qrange()
            self.Z = _t(p["zero"]).repeat_interleave(self.sub, 1)
            self.rel["scale"] = torch.zeros(N, K // self.sub)
        else:  # the block geometry and code range are the layout's (grids.LAYOUTS); the parameters say the kind
            lay = LAYOUTS[g.type]
            self.sub, self.lo, self.hi = lay.sub, lay.lo, lay.hi
            self.kind = "k" if "dmin" in p else "q6k" if "sc" in p else "dm" if "m" in p else "d"
            self.Z = torch.full((N, K), float(lay.offset))
            self.rel["d"] = torch.zeros(p["d"].shape)
            if self.kind == "k":
                self.rel["dmin"] = torch.zeros(p["dmin"].shape)
                self.int["sc"] = torch.zeros(p["sc"].shape)
                self.int["m"] = torch.zeros(p["m"].shape)
            elif self.kind == "q6k":
                self.int["sc"] = torch.zeros(p["sc"].shape)
            elif self.kind == "dm":
                self.rel["m"] = torch.zeros(p["m"].shape)  # additive in units of d (m may be 0)
        for v in (*self.rel.values(), *self.int.values()):
            v.requires_grad_(True)
        self.raw = {k: _t(v) for k, v in p.items()}
        self.u = self.V = None
        if u is not None:
            S0, _ = self.scale_min(hard=True, zero_corr=True)
            live = S0.repeat_interleave(self.sub, 1) != 0
            self.u = torch.where(live, u, self.codes - self.Z)  # dead blocks: the codes as they are (no gradient)
            self.V = torch.zeros(N, K, requires_grad=True)

    def _i(self, name: str, zero_corr: bool) -> torch.Tensor:
        """An integer sub-block parameter as stored: 6-bit in k-quants, int8 in Q6_K."""
        x = self.raw[name] if zero_corr else self.raw[name] + self.int[name]
        lo, hi = (-128, 127) if self.kind == "q6k" else (0, 63)
        return torch.clamp(_ste_round(x), lo, hi)

    def _r(self, name: str, zero_corr: bool) -> torch.Tensor:
        return self.raw[name] if zero_corr else self.raw[name] * (1 + self.rel[name])

    def scale_min(self, hard: bool = False, zero_corr: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Effective scale and min per sub-block [N, K / sub]; ``hard``: continuous parameters rounded as stored."""
        def r(name):
            v = self._r(name, zero_corr)
            return (fp16_round_t(v) if name != "scale" else _round_scale(v, self.q.grid.scale_dtype)) if hard else v

        N = self.codes.shape[0]
        if self.kind == "int":
            return r("scale"), None
        if self.kind == "d":
            return r("d"), None
        if self.kind == "dm":  # w = d·q + m: min = −m, m corrected in units of d
            d = r("d")
            m = self.raw["m"] + (0 if zero_corr else self.rel["m"] * self.raw["d"])
            return d, -(fp16_round_t(m) if hard else m)
        if self.kind == "q6k":
            return (r("d")[..., None] * self._i("sc", zero_corr)).reshape(N, -1), None
        S = (r("d")[..., None] * self._i("sc", zero_corr)).reshape(N, -1)
        M = (r("dmin")[..., None] * self._i("m", zero_corr)).reshape(N, -1)
        return S, M

    def centred(self, hard: bool = False) -> torch.Tensor:
        if self.V is None:
            return self.codes - self.Z
        v = self.V.detach() if hard else self.V
        return torch.clamp(_ste_round(self.u + v) + self.Z, self.lo, self.hi) - self.Z

    def weight(self, hard: bool = False, zero_corr: bool = False) -> torch.Tensor:
        S, M = self.scale_min(hard, zero_corr)
        w = S.repeat_interleave(self.sub, 1) * (self.codes - self.Z if zero_corr else self.centred(hard))
        return w if M is None else w - M.repeat_interleave(self.sub, 1)

    def encode(self) -> QuantizedTensor:
        """The tuned parameters in the grid's storage form (what ``weight(hard=True)`` computes)."""
        p = dict(self.q.params)
        with torch.no_grad():
            for name in self.rel:
                if self.kind == "dm" and name == "m":
                    v = fp16_round_t(self.raw["m"] + self.rel["m"] * self.raw["d"])
                elif name == "scale":
                    v = _round_scale(self._r(name, False), self.q.grid.scale_dtype)
                else:
                    v = fp16_round_t(self._r(name, False))
                ok = torch.isfinite(v) & ((v > 0) if name == "scale" else torch.ones_like(v, dtype=torch.bool))
                p[name] = torch.where(ok, v, self.raw[name]).numpy().astype(p[name].dtype)
            for name in self.int:
                p[name] = self._i(name, False).numpy().astype(p[name].dtype)
            codes = self.q.codes if self.V is None else (self.centred(hard=True) + self.Z).numpy().astype(self.q.codes.dtype)
        return QuantizedTensor(self.q.grid_id, codes, p)

    def params(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return list(self.rel.values()), list(self.int.values())


def code_units(q: QuantizedTensor, updated: torch.Tensor) -> torch.Tensor:
    """GPTQ's error-updated weights in the units of the codes minus the zero point (round(u) + Z = the codes)."""
    lin = _Linear(q, None)
    with torch.no_grad():
        S, M = lin.scale_min(hard=True, zero_corr=True)
        S = S.repeat_interleave(lin.sub, 1)
        w = updated if M is None else updated + M.repeat_interleave(lin.sub, 1)
        return w / torch.where(S != 0, S, torch.ones_like(S))


def fp16_round_t(x: torch.Tensor) -> torch.Tensor:
    """fp16 rounding as a straight-through op (the stored value forward, the identity's gradient back)."""
    return x + (x.to(torch.float16).float() - x).detach()


def tune_layer_scales(layer: torch.nn.Module, quant: dict[str, QuantizedTensor], inputs, targets,
                      kws: list[dict], epochs: int = 1, lr: float | None = None,
                      cont: dict[str, torch.Tensor] | None = None,
                      frozen: set[str] | frozenset = frozenset(), lr_scale: float = 1.0,
                      ) -> tuple[dict[str, QuantizedTensor], dict]:
    """``quant``: {linear name inside the layer: its solved result}; ``inputs``/``targets``: the quantized model's
    layer inputs and the fp model's layer outputs, batch by batch; ``cont``: {linear name: GPTQ's error-updated
    weights in code units (``code_units``)} for the linears whose rounding is learned too; ``frozen``: linears of
    ``quant`` that take part quantized but are not tuned (tuned already, in another set); ``lr_scale``: multiplies
    every peak step (the recipe's ``tune_lr``). Returns the
    results with tuned parameters (or the given ones when tuning did not help) and a record (loss before/after)."""
    if not kws or epochs <= 0:
        return quant, {}
    lr = (SCALE_LR if lr is None else lr) * lr_scale
    cont = cont or {}
    with torch.inference_mode(False), torch.enable_grad():
        lins = {n: _Linear(q, cont.get(n)) for n, q in quant.items() if tunable(q.grid) and n not in frozen}
        if not lins:
            return quant, {}
        base = {k: _plain(v) for k, v in layer.state_dict().items()}
        for n, q in quant.items():  # the set's other linears take part as solved
            if n not in lins:
                base[f"{n}.weight"] = torch.from_numpy(q.dequantize())
        kws_p = [_plain_kw(kw) for kw in kws]

        def weights(**how) -> dict[str, torch.Tensor]:
            p = dict(base)
            for n, lin in lins.items():
                p[f"{n}.weight"] = lin.weight(**how)
            return p

        def out_of(params, h, kw):
            r = functional_call(layer, params, (h,), kw)
            return r[0] if isinstance(r, tuple) else r

        every = max(1, len(kws_p) // CHECK_BATCHES)

        def check_loss(**how) -> float:
            with torch.no_grad():
                p = weights(**how)
                return sum(float(((out_of(p, _plain(h), kw) - _plain(y)) ** 2).mean())
                           for i, (h, y, kw) in enumerate(zip(inputs, targets, kws_p, strict=True)) if i % every == 0)

        before = check_loss(hard=True, zero_corr=True)
        rel = [t for lin in lins.values() for t in lin.params()[0]]
        ints = [t for lin in lins.values() for t in lin.params()[1]]
        offs = [lin.V for lin in lins.values() if lin.V is not None]
        groups = [{"params": rel, "lr": lr}, {"params": ints, "lr": INT_LR * lr_scale},
                  {"params": offs, "lr": ROUND_LR * lr_scale}]
        opt = torch.optim.Adam([g for g in groups if g["params"]])
        steps = epochs * len(kws_p)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / steps)
        for _ in range(epochs):  # one Adam step per forward batch (steps of one window, 4× as many: no better)
            for h, y, kw in zip(inputs, targets, kws_p, strict=True):
                opt.zero_grad(set_to_none=True)
                loss = ((out_of(weights(), _plain(h), kw) - _plain(y)) ** 2).mean()
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    for v in offs:
                        v.clamp_(-0.5, 0.5)
        after = check_loss(hard=True)
        moved = sum(int((lin.centred(hard=True) != lin.codes - lin.Z).sum()) for lin in lins.values() if lin.V is not None)
        rec = {"loss_before": before, "loss_after": after, "epochs": epochs, "lr": lr, "kept": after < before,
               "codes_changed": moved}
        if after >= before:
            return quant, rec
        out = dict(quant)
        for n, lin in lins.items():
            out[n] = lin.encode()
    return out, rec
