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

from ..memory import narrow_to_float32_, trim_heap
from .grids import Grid, Params, QuantizedTensor


def fp_target_weights(W: torch.Tensor, H: torch.Tensor, G: torch.Tensor, damp: float) -> torch.Tensor:
    """The weights whose output on the quantized model's inputs X̃ best matches the fp layer's output on the fp inputs X:
    argmin_V ‖X Wᵀ − X̃ Vᵀ‖² = W Gᵀ H⁻¹ with H = X̃ᵀX̃, G = X̃ᵀX (both on the same scale), regularised towards W.

    ‖X Wᵀ − X̃ Qᵀ‖² = ‖X̃ (V − Q)ᵀ‖² + const for any Q, so GPTQ on V with H minimises the error against the fp
    model's output ("asymmetric calibration", GPTAQ): the quantized model's accumulated input error is compensated
    instead of copied. Measured: neutral on the bundled model, far worse on SmolLM2-135M (KLD 2.0 vs 0.10 at W4 g64:
    V amplifies the input error through low-variance directions), so it is opt-in (recipe ``target = "fp"``)."""
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * torch.diag(Hd).mean().clamp_min(1e-12))
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        return W
    # ridge towards W, not towards 0: argmin ‖XWᵀ − X̃Vᵀ‖² + λ‖V − W‖² ⇒ Vᵀ = Wᵀ + (H + λI)⁻¹(G − H)Wᵀ
    Wd = W.double()
    D = torch.cholesky_solve((G.double() - H.double()) @ Wd.T, L).T
    return (Wd + D).to(W.dtype).contiguous()


def inverse_hessian_cholesky(H: torch.Tensor, damp: float, block: int = 256,
                             perm: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (UᵀU = (H + λI)⁻¹) with λ = damp·mean(diag H); retries with more damping.

    Computed in float64 inside ONE in×in buffer: H + λI = ŨŨᵀ with Ũ upper (Cholesky from the bottom-right corner),
    then U = Ũ⁻¹, both blocked and in place, and the float32 result written over the first half of the same buffer.
    For a 14336-wide down_proj input that is 1.6 GB at peak where factor, inverse and factor again took 3.3 GB.
    ``perm``: factor H[perm][:, perm] (act-order), gathered into the buffer a row block at a time (no permuted copy)."""
    n = H.shape[0]
    mean_diag = torch.diag(H).double().mean().clamp_min(1e-12)
    A = torch.empty(n, n, dtype=torch.float64)
    for attempt in range(6):
        if perm is None:
            A.copy_(H)
        else:
            for r0 in range(0, n, block):
                A[r0 : r0 + block] = H[perm[r0 : r0 + block]][:, perm]
        A.diagonal().add_(damp * (10**attempt) * mean_diag)  # = H + λI, without the identity matrix
        if _reverse_cholesky_(A, block):
            _upper_inverse_(A, block)
            return narrow_to_float32_(A, block)  # float32 in the buffer's first half; the rest goes back
    raise RuntimeError("Hessian is not positive definite even with heavy dampening")


def _reverse_cholesky_(A: torch.Tensor, b: int) -> bool:
    """A (symmetric positive definite) → upper Ũ with A = ŨŨᵀ, in place, b×b blocks from the last; False if a
    diagonal block is not positive definite."""
    n = A.shape[0]
    for k1 in range(n, 0, -b):
        k0 = max(0, k1 - b)
        A11 = A[k0:k1, k0:k1]
        L, info = torch.linalg.cholesky_ex(A11.flip(0, 1))  # J·A11·J = LLᵀ ⇒ A11 = (JLJ)(JLJ)ᵀ, JLJ upper
        if int(info) != 0:
            return False
        U11 = L.flip(0, 1)
        A11.copy_(U11)
        A[k1:, k0:k1] = 0.0
        if k0:
            A01 = A[:k0, k0:k1]  # A01 = Ũ01·Ũ11ᵀ
            A01.copy_(torch.linalg.solve_triangular(U11.T, A01, upper=False, left=False))
            for r0 in range(0, k0, b):  # A00 − Ũ01Ũ01ᵀ = Ũ00Ũ00ᵀ, upper triangle only (all that is read): half the flops
                r1 = min(k0, r0 + b)
                A[r0:r1, r0:k0].addmm_(A01[r0:r1], A01[r0:k0].T, alpha=-1.0)
    return True


def _upper_inverse_(A: torch.Tensor, b: int) -> None:
    """Upper-triangular A → A⁻¹ in place, b×b blocks from the first: [[U00, U01], [0, U11]]⁻¹ has the corner
    −U00⁻¹·U01·U11⁻¹, and U00⁻¹ is already in place when block column k0:k1 is reached."""
    n = A.shape[0]
    for k0 in range(0, n, b):
        k1 = min(n, k0 + b)
        U11 = A[k0:k1, k0:k1]
        if k0:
            X = torch.empty(k0, k1 - k0, dtype=A.dtype)
            for r0 in range(0, k0, b):  # U00⁻¹ is upper: row block r meets its columns r0… only (half the flops)
                r1 = min(k0, r0 + b)
                torch.mm(A[r0:r1, r0:k0], A[r0:k0, k0:k1], out=X[r0:r1])
            A[:k0, k0:k1] = torch.linalg.solve_triangular(U11, X, upper=True, left=False).neg_()
        U11.copy_(torch.linalg.solve_triangular(U11, torch.eye(k1 - k0, dtype=A.dtype), upper=True))


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
                  hessian_key: Hashable = None, updated: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantize W [N, K] on ``grid`` minimising the proxy ‖(W − Q)X‖² with H = 2XᵀX/n.

    ``updated`` (float32 [N, K]): filled with the error-updated weight of every column at the moment it was rounded
    (natural column order) — the continuous values GPTQ's codes are the nearest grid points of, from which
    block-wise tuning learns where rounding the other way pays (tune.py).

    ``factors`` (with ``hessian_key`` naming H): a cache of the inverse-Hessian factor, which depends only on H, the
    column order and the damping — linears that share an input (q/k/v, gate/up) and every grid of one order reuse it.
    """
    N, K = W.shape
    H = H.detach().float()
    dead = torch.diag(H) == 0
    if bool(dead.any()):  # the caller's H is shared by the linears of one input: changed on a copy only
        H = H.clone()
        H[dead, dead] = 1.0
    importance = torch.diag(H).clone()  # imatrix-like weighting for the group fits
    gc = grid.group_cols(K)
    n_groups = K // gc
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    key = (hessian_key, act_order, damp) if factors is not None and hessian_key is not None else None
    U = factors.get(key) if key is not None else None
    if U is None:
        if factors is not None:
            factors.clear()  # one factor at a time: the other column order's is recomputed rather than held
        trim_heap()  # the factor's n² fp64 buffer is a layer's peak: first hand back the heap's free pages
        U = inverse_hessian_cholesky(H, damp, perm=perm if act_order else None)
        if key is not None:
            factors[key] = U

    # the working copy of W only now: it is not held while the factor's fp64 buffer exists
    W = W.detach().float().clone()
    W[:, dead] = 0.0
    groups: list[Params | None] = [None] * n_groups
    if act_order:
        for g in range(n_groups):  # static groups: fit on the original weights
            groups[g] = grid.fit(W[:, g * gc : (g + 1) * gc], importance[g * gc : (g + 1) * gc], clip)
        W = W[:, perm]  # the sweep's column order; the natural-order copy is not needed again

    B = gc * max(1, block // gc) if gc <= max(block, 256) else block
    if gc > B and not act_order:  # per-channel (or huge groups): fit once on the whole row range
        for g in range(n_groups):
            groups[g] = grid.fit(W[:, g * gc : (g + 1) * gc], importance[g * gc : (g + 1) * gc], clip)
    Q = torch.zeros(N, K, dtype=torch.uint8)  # integer codes (every grid's are 0…255): a quarter of float32
    with _threads(1 if N * B < (1 << 20) else 2):
        _sweep(W, U, Q, groups, grid, importance, perm, gc, B, clip, updated)
    return grid.stack([g for g in groups if g is not None], Q[:, torch.argsort(perm)])


def _sweep(W: torch.Tensor, U: torch.Tensor, Q: torch.Tensor, groups: list, grid: Grid,
           importance: torch.Tensor, perm: torch.Tensor, gc: int, B: int, clip: bool,
           updated: torch.Tensor | None = None) -> None:
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
            if updated is not None:
                updated[:, col] = w
            q = grid.quant_col(w, p, j)
            Q[:, i1 + i] = q
            err = (w - grid.dequant_col(q, p, j)) / U1[i, i]
            t = outer[:, : i2 - i1 - i]
            torch.mul(err[:, None], U1[i, i:][None, :], out=t)  # the same products and subtraction as W1 -= err·u
            W1[:, i:].sub_(t)
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
