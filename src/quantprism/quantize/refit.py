"""Hessian-weighted refit of group scales once the integer codes are fixed.

GPTQ decides codes column by column with scales fitted before the sweep (static groups: on the original weights), so
the scales are not the best ones for the codes it chose. With codes q and zero points z fixed, a row's dequantized
weights are linear in its group scales, ŵ = A·s (A: the centred codes q − z placed in their group's columns), and
the layer-output proxy (w − ŵ)ᵀH(w − ŵ) is a quadratic in s: the best scales solve the G×G system
(AᵀHA)·s = AᵀH·w per row. Each row's proxy error can only go down (up to the scale dtype's rounding, which is
checked: a row keeps its old scales where the rounded new ones are not better).
"""
from __future__ import annotations

import numpy as np
import torch

from .grids import IntGrid, QuantizedTensor, _round_scale

REFIT_ELEMS = 1 << 24  # rows per chunk so that the rows × K × G intermediate stays ≤ 64 MB of float32


def row_errors(W: torch.Tensor, D: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """(w − ŵ)ᵀH(w − ŵ) per row."""
    E = W - D
    return ((E @ H) * E).sum(1)


def refit_scales(W: torch.Tensor, H: torch.Tensor, qt: QuantizedTensor) -> QuantizedTensor:
    """``qt`` (an IntGrid result of W [N, K]) with every row's group scales re-solved against H; codes unchanged."""
    grid = qt.grid
    if not isinstance(grid, IntGrid):
        return qt
    N, K = qt.codes.shape
    gc = grid.group_cols(K)
    G = K // gc
    H = H.float()
    W = W.float()
    codes = torch.from_numpy(qt.codes.astype(np.float32))
    zero = torch.from_numpy(qt.params["zero"].astype(np.float32))
    scale = torch.from_numpy(qt.params["scale"].astype(np.float32))
    Hb = H.view(K, G, gc)
    rows = max(1, REFIT_ELEMS // (K * G))
    new = scale.clone()
    for a in range(0, N, rows):
        b = min(N, a + rows)
        A = (codes[a:b] - zero[a:b].repeat_interleave(gc, 1)).view(b - a, G, gc)  # centred codes per group
        T = torch.einsum("ihk,rhk->rih", Hb, A)  # (H·A_h) for every group h: [rows, K, G]
        M = torch.einsum("rgk,rgkh->rgh", A, T.view(b - a, G, gc, G))  # AᵀHA per row
        rhs = torch.einsum("rgk,rgk->rg", A, (W[a:b] @ H).view(b - a, G, gc))  # AᵀH·w per row
        ridge = 1e-6 * torch.diagonal(M, dim1=1, dim2=2).mean(1).clamp_min(1e-20)
        M.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
        s, info = torch.linalg.solve_ex(M.double(), rhs.double()[..., None])
        s = _round_scale(s[..., 0].float(), grid.scale_dtype)
        ok = (info == 0)[:, None] & torch.isfinite(s) & (s > 0)
        s = torch.where(ok, s, scale[a:b])
        old_d = (scale[a:b].repeat_interleave(gc, 1) * A.view(b - a, K))
        new_d = (s.repeat_interleave(gc, 1) * A.view(b - a, K))
        better = row_errors(W[a:b], new_d, H) < row_errors(W[a:b], old_d, H)
        new[a:b] = torch.where(better[:, None], s, scale[a:b])
    out = QuantizedTensor(qt.grid_id, qt.codes, dict(qt.params))
    out.params["scale"] = new.numpy().astype(qt.params["scale"].dtype)
    return out

