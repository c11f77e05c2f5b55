"""Per-channel scalings that are exact equivalences in floating point, chosen for their outlier strategy.

A scale vector s on a linear's input channels multiplies the weight columns (W·diag(s)) and is
divided out of whatever produces that input: the preceding RMSNorm's gain (q/k/v, gate/up), v's
rows (o_proj, only without GQA so one v row feeds one o column) or up's rows (down_proj). The
Hessian of the scaled input follows exactly: H' = diag(1/s)·H·diag(1/s).

- AWQ: s = x̄^r / w̄^(1−r), r searched on a grid per layer against the target grid's RTN error of
  the group's outputs (activation-aware: salient input channels get finer effective steps).
- SmoothQuant: s = max|x|^α / max|w|^(1−α), moving activation outliers into the weights so that
  per-token int8 activations (W8A8) lose less.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.archs import LLAMA, Arch
from .grids import Grid
from .stats import InputStats

# what produces each group's input, where a scale is divided out (mlp_in: the architecture's MLP norm)
PREDECESSOR = {"attn_in": "input_layernorm", "attn_out": "self_attn.v_proj", "mlp_out": "mlp.up_proj"}


def foldable(layer: torch.nn.Module, group: str, arch: Arch = LLAMA) -> bool:
    """Whether a scale on ``group``'s inputs can be divided out of what produces them exactly. Not for v→o and
    up→down where v / up are rows of a fused module (Phi-3's qkv_proj, gate_up_proj): left unscaled there."""
    if group in ("attn_out", "mlp_out") and not arch.fold_out:
        return False
    if group == "attn_out":
        v, o = layer.get_submodule("self_attn.v_proj"), layer.get_submodule("self_attn.o_proj")
        return v.out_features == o.in_features
    return True


def apply_scales(layer: torch.nn.Module, group: str, s: torch.Tensor, arch: Arch = LLAMA) -> None:
    """Fold s into the group's linears (columns ×s) and its predecessor (outputs ÷s), in place.

    A norm computing x̂·(c + w) (Gemma: c = 1) gets (c + w)/s, i.e. w ← (c + w)/s − c: dividing w alone
    would leave c·x̂ unscaled and the fold would not be exact."""
    s = s.float()
    with torch.no_grad():
        for lin in arch.input_groups[group]:
            m = layer.get_submodule(lin)
            m.weight.mul_(s[None, :].to(m.weight.dtype))
        prev = layer.get_submodule(arch.mlp_norm if group == "mlp_in" else PREDECESSOR[group])
        if isinstance(prev, torch.nn.Linear):
            prev.weight.div_(s[:, None].to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:  # RMSNorm gain
            c = arch.norm_offset
            gain = (prev.weight.float() + c) / s
            prev.weight.copy_((gain - c).to(prev.weight.dtype))


def scaled_hessian(H: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    inv = 1.0 / s.float()
    return H * inv[:, None] * inv[None, :]


def _normalise(s: torch.Tensor) -> torch.Tensor:
    s = s.clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def smoothquant_scales(layer: torch.nn.Module, group: str, st: InputStats, alpha: float,
                       arch: Arch = LLAMA) -> torch.Tensor:
    wmax = torch.stack([layer.get_submodule(n).weight.detach().abs().amax(0).float()
                        for n in arch.input_groups[group]]).amax(0)
    s = st.absmax.clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha)
    return _normalise(s)


SQ_ALPHAS = tuple(i / 10 for i in range(1, 10))


def grid_descent(n: int, err: Callable[[int], float], stride: int = 3) -> dict[int, float]:
    """Errors of a subset of candidates 0 … n−1 on a 1-D grid: every ``stride``-th one (centred), then the neighbours
    of the best so far until it has both evaluated — a local minimum of the grid, in 5–6 evaluations of 9 (6–7 of
    10); each evaluation is a rounding of the group's weights plus a product with the calibration sample. Output
    error against a migration strength (SmoothQuant's α, AWQ's ratio) is mostly a single valley, where this is the
    exhaustive search's choice (all 90 α of SmolLM2's Q4_K_M recipe); where it has two, the search may stop in the
    other (one input of SmolLM2's ONNX 4-bit SmoothQuant recipe, layer 3). stride 1 is the exhaustive search."""
    errs: dict[int, float] = {}
    for i in range((n - 1) % stride // 2, n, stride):
        errs[i] = err(i)
    while True:
        b = min(errs, key=errs.__getitem__)
        todo = [j for j in (b - 1, b + 1) if 0 <= j < n and j not in errs]
        if not todo:
            return errs
        for j in todo:
            errs[j] = err(j)


def best_or_none(n: int, err: Callable[[int], float], unscaled: float, stride: int) -> tuple[int | None, float, int]:
    """``grid_descent`` over candidates 0 … n−1 against "no scaling" (error ``unscaled``, always a candidate so a
    search never loses to plain rounding; it wins ties): (the chosen index or None, its error, evaluations)."""
    errs = grid_descent(n, err, stride)
    i = min(errs, key=errs.__getitem__)
    return (i, errs[i], len(errs) + 1) if errs[i] < unscaled else (None, unscaled, len(errs) + 1)


def smoothquant_search(layer: torch.nn.Module, group: str, st: InputStats, grid: Grid,
                       act: Callable[[torch.Tensor], torch.Tensor] | None, arch: Arch = LLAMA,
                       stride: int = 3) -> tuple[torch.Tensor, dict]:
    """SmoothQuant's migration strength α chosen per layer and input: the candidate (no scaling, α = 0.1 … 0.9)
    whose group output, with the runtime's activation rounding ``act`` applied to the scaled inputs and the scaled
    weights rounded on ``grid`` (RTN: the search ranks candidates, GPTQ solves the chosen one), is closest to the fp
    output on the calibration sample. A fixed α trades activation outliers for weight outliers blindly; layers
    differ (on SmolLM2 a few carry massive activations, most none). α is searched by ``grid_descent`` (stride 1:
    every candidate)."""
    x = st.x_sample
    lins = [layer.get_submodule(n) for n in arch.input_groups[group]]
    W = torch.cat([m.weight.detach().float() for m in lins], 0)
    y_ref = x @ W.T
    wmax = torch.stack([m.weight.detach().abs().amax(0).float() for m in lins]).amax(0)

    def scales(alpha: float | None) -> torch.Tensor:
        return torch.ones(W.shape[1]) if alpha is None else _normalise(
            st.absmax.clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha))

    def err(alpha: float | None) -> float:
        s = scales(alpha)
        Wq = torch.from_numpy(grid.rtn(W * s[None, :], None, clip=False).dequantize()).float()
        xs = x / s[None, :]
        if act is not None:
            xs = act(xs)
        return float(((xs @ Wq.T - y_ref) ** 2).mean())

    unscaled = err(None)
    i, mse, evaluated = best_or_none(len(SQ_ALPHAS), lambda i: err(SQ_ALPHAS[i]), unscaled, stride)
    alpha = None if i is None else SQ_ALPHAS[i]
    return scales(alpha), {"alpha": alpha, "mse": mse, "mse_unscaled": unscaled, "evaluated": evaluated}


Solver = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (scaled W, scaled H) → dequantized W


def rtn_solver(grid: Grid) -> Solver:
    def solve(w: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(grid.rtn(w, None, clip=False).dequantize())

    return solve


def awq_search(layer: torch.nn.Module, group: str, st: InputStats, grid: Grid, n_grid: int = 20,
               solver: Solver | None = None, arch: Arch = LLAMA, stride: int = 3) -> tuple[torch.Tensor, dict]:
    """The ratio r ∈ [0, 1) minimising the group's output MSE with scales x̄^r/w̄^(1−r) (``grid_descent`` over
    r = i / n_grid).

    ``solver`` rounds the scaled weights as the recipe will (RTN by default; GPTQ for awq+gptq,
    so the search optimises what is finally shipped, and "no scaling" stays a candidate).
    """
    solver = solver or rtn_solver(grid)
    H = st.hessian
    x = st.x_sample
    lins = [layer.get_submodule(n) for n in arch.input_groups[group]]
    W = torch.cat([m.weight.detach().float() for m in lins], 0)
    y_ref = x @ W.T
    x_mean = x.abs().mean(0)
    w_norm = W.abs() / W.abs().amax(1, keepdim=True).clamp_min(1e-8)
    w_mean = w_norm.mean(0)

    def scales(r: float | None) -> torch.Tensor:
        return torch.ones_like(x_mean) if r is None else _normalise(
            x_mean.clamp_min(1e-4) ** r / w_mean.clamp_min(1e-4) ** (1 - r))

    def err(r: float | None) -> float:
        s = scales(r)
        Hs = scaled_hessian(H, s)
        Wq = torch.cat([solver(Wi * s[None, :], Hs) for Wi in W.split([m.out_features for m in lins])]) / s[None, :]
        return float(((x @ Wq.T - y_ref) ** 2).mean())

    unscaled = err(None)
    i, mse, evaluated = best_or_none(n_grid, lambda i: err(i / n_grid), unscaled, stride)
    r = None if i is None else i / n_grid
    return scales(r), {"ratio": -1.0 if r is None else r, "mse": mse, "mse_unscaled": unscaled, "evaluated": evaluated}
