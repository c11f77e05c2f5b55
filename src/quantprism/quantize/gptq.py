"""GPTQ (Frantar et al. 2022), written once and generic over grids.

Cholesky form of the inverse Hessian, lazy block updates, dampening as a setting. Group
parameters are fitted when the sweep enters a group, on the error-updated weights of that whole
group (the block size is a multiple of the group so those weights are final). ``act_order``
uses static groups: parameters are fitted on the original weights first, then columns are
visited in decreasing Hessian-diagonal order — group membership stays ``col // group``, which
is what runtimes that ignore ``g_idx`` (vLLM) compute.
"""
from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator

import torch

from .grids import Grid, Params, QuantizedTensor


def inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp·mean(diag H); retries with more damping.

    In float64, holding at most two in×in float64 buffers at a time (each intermediate is freed as soon as the next
    exists): for a 14336-wide down_proj input that is 3.3 GB instead of 8."""
    mean_diag = torch.diag(H).double().mean().clamp_min(1e-12)
    for attempt in range(6):
        lam = damp * (10**attempt) * mean_diag
        Hd = H.double()
        Hd.diagonal().add_(lam)  # = H + λI, without the identity matrix
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info2) == 0:
                return U.float()
    raise RuntimeError("Hessian is not positive definite even with heavy dampening")


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """The column sweep is thousands of tiny ops: thread hand-offs cost more than they give."""
    old = torch.get_num_threads()
    torch.set_num_threads(min(n, old))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, grid: Grid, damp: float = 0.01, clip: bool = True,
                  act_order: bool = False, block: int = 128, factors: dict | None = None,
                  hessian_key: Hashable = None) -> QuantizedTensor:
    """Quantize W [N, K] on ``grid`` minimising the proxy ‖(W − Q)X‖² with H = 2XᵀX/n.

    ``factors`` (with ``hessian_key`` naming H): a cache of the inverse-Hessian factor, which depends only on H, the
    column order and the damping — linears that share an input (q/k/v, gate/up) and every grid of one order reuse it.
    """
    W = W.detach().float().clone()
    N, K = W.shape
    H = H.detach().float()
    dead = torch.diag(H) == 0
    if bool(dead.any()):  # the caller's H is shared by the linears of one input: changed on a copy only
        H = H.clone()
        H[dead, dead] = 1.0
    W[:, dead] = 0.0
    importance = torch.diag(H).clone()  # imatrix-like weighting for the group fits
    gc = grid.group_cols(K)
    n_groups = K // gc

    groups: list[Params | None] = [None] * n_groups
    perm = torch.arange(K)
    if act_order:
        for g in range(n_groups):  # static groups: fit on the original weights
            groups[g] = grid.fit(W[:, g * gc : (g + 1) * gc], importance[g * gc : (g + 1) * gc], clip)
        perm = torch.argsort(torch.diag(H), descending=True)
    Wp = W[:, perm] if act_order else W
    key = (hessian_key, act_order, damp) if factors is not None and hessian_key is not None else None
    U = factors.get(key) if key is not None else None
    if U is None:
        if factors is not None:
            factors.clear()  # one factor at a time: the other column order's is recomputed rather than held
        U = inverse_hessian_cholesky(H[perm[:, None], perm[None, :]] if act_order else H, damp)
        if key is not None:
            factors[key] = U

    B = gc * max(1, block // gc) if gc <= max(block, 256) else block
    if gc > B and not act_order:  # per-channel (or huge groups): fit once on the whole row range
        for g in range(n_groups):
            groups[g] = grid.fit(W[:, g * gc : (g + 1) * gc], importance[g * gc : (g + 1) * gc], clip)
    Q = torch.zeros(N, K)
    with _threads(1 if N * B < (1 << 20) else 2):
        _sweep(Wp, U, Q, groups, grid, importance, perm, gc, B, clip)
    return grid.stack([g for g in groups if g is not None], Q[:, torch.argsort(perm)])


def _sweep(W: torch.Tensor, U: torch.Tensor, Q: torch.Tensor, groups: list, grid: Grid,
           importance: torch.Tensor, perm: torch.Tensor, gc: int, B: int, clip: bool) -> None:
    K = W.shape[1]
    outer = torch.empty(W.shape[0], B)  # the rank-1 update's product, reused: no allocation per column
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g, j = divmod(col, gc)
            if groups[g] is None:  # entering a group in natural order: fit on updated weights
                groups[g] = grid.fit(W1[:, i : i + gc], importance[col : col + gc], clip)
            p = groups[g]
            w = W1[:, i]
            q = grid.quant_col(w, p, j)
            Q[:, i1 + i] = q
            err = (w - grid.dequant_col(q, p, j)) / U1[i, i]
            t = outer[:, : i2 - i1 - i]
            torch.mul(err[:, None], U1[i, i:][None, :], out=t)  # the same products and subtraction as W1 -= err·u
            W1[:, i:].sub_(t)
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
