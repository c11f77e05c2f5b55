"""Buffers bounded for large layers, with the same numbers: the inverse-Hessian factor (one in-place float64 buffer,
the textbook route's factor), row-chunked dequantization, column-blocked XᵀX."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quantprism.quantize import grids, stats
from quantprism.quantize.gptq import inverse_hessian_cholesky
from quantprism.quantize.grids import grid_from_id


def _textbook(H: torch.Tensor, lam: float) -> torch.Tensor:
    """Factor, invert, factor again (what GPTQ's reference code does), all in float64."""
    Hd = H.double() + lam * torch.eye(H.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)


@pytest.mark.parametrize("n, block", [(1, 256), (96, 32), (300, 64), (700, 256)])  # blocks that do and do not tile n
def test_factor_equals_textbook_route(n, block):
    g = torch.Generator().manual_seed(n)
    X = torch.randn(2 * n + 8, n, generator=g) * torch.rand(n, generator=g)  # uneven channel scales
    X[:, : max(1, n // 50)] *= 40.0  # and a few outlier channels, as trained models have
    H = (2 * X.T @ X / X.shape[0]).float()
    lam = 0.01 * float(torch.diag(H).double().mean())
    U = inverse_hessian_cholesky(H, 0.01, block=block)
    ref = _textbook(H, lam)
    assert U.dtype == torch.float32 and U.shape == (n, n)
    assert bool((torch.tril(U, -1) == 0).all()), "the factor is upper triangular"
    assert bool((torch.diagonal(U) > 0).all())
    # both routes are float64 then rounded once to float32: a few float32 ulps of the largest entry at most
    assert float((U.double() - ref).abs().max()) <= 8 * torch.finfo(torch.float32).eps * float(ref.abs().max())
    assert torch.allclose(U.double().T @ U.double(), torch.cholesky_inverse(torch.linalg.cholesky(
        H.double() + lam * torch.eye(n, dtype=torch.float64))), rtol=1e-5, atol=1e-6 * float(ref.abs().max()) ** 2)


def test_permuted_factor_is_the_factor_of_the_permuted_hessian():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 200, generator=g) * torch.rand(200, generator=g)
    H = (2 * X.T @ X / 400).float()
    perm = torch.argsort(torch.diag(H), descending=True)
    a = inverse_hessian_cholesky(H, 0.01, block=48, perm=perm)
    b = inverse_hessian_cholesky(H[perm][:, perm].contiguous(), 0.01, block=48)
    # the damping's mean of the diagonal is summed in another order: equal up to float32 rounding
    assert torch.allclose(a, b, rtol=0, atol=4 * torch.finfo(torch.float32).eps * float(b.abs().max()))


def test_singular_hessian_gets_more_damping():
    """A rank-deficient H (fewer tokens than channels, and a dead channel) still factors: damping makes it definite."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 64, generator=g)
    X[:, 3] = 0
    H = (2 * X.T @ X / 10).float()
    U = inverse_hessian_cholesky(H, 1e-9, block=16)
    assert torch.isfinite(U).all() and bool((torch.diagonal(U) > 0).all())


def test_indefinite_matrix_is_refused():
    H = -torch.eye(8)
    with pytest.raises(RuntimeError, match="not positive definite"):
        inverse_hessian_cholesky(H, 0.01)


@pytest.mark.parametrize("gid", ["int4_g128_sym_fp16", "int8_gc_sym_n_fp32", "q4_k_imat", "q6_k_imat", "q8_0", "iq4_xs_imat"])
def test_row_chunked_dequantize_is_the_whole_one(gid, monkeypatch):
    W = torch.randn(300, 512, generator=torch.Generator().manual_seed(1))
    q = grid_from_id(gid).rtn(W, torch.ones(512), clip=True)
    whole = q.grid.dequantize(q.codes, q.params)
    monkeypatch.setattr(grids, "DEQUANT_CHUNK_BYTES", 4 * 512 * 7)  # 7 rows a chunk: 43 chunks, the last one short
    assert np.array_equal(q.dequantize(), whole)


@pytest.mark.parametrize("knob", ["bytes", "cols"])
def test_triangular_blocked_xtx_is_the_whole_product(monkeypatch, knob):
    x = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(2))
    if knob == "bytes":
        monkeypatch.setattr(stats, "XTX_BLOCK_BYTES", 4 * 24 * 5)  # 5 columns a block: the last block short
    else:
        monkeypatch.setattr(stats, "XTX_BLOCK_COLS", 7)
    st = stats.InputStats(24, sample_tokens=0)
    for b in x:
        st.add(b)
    ref = sum(b.double().T @ b.double() for b in x)
    # accumulated: the upper triangle, every column block of it (a skipped or short block fails)
    assert torch.allclose(torch.triu(st.xtx), torch.triu(ref), rtol=1e-5, atol=1e-4)
    before = st.hessian  # mirrored on a copy while accumulating
    st.to_cpu()
    H = st.hessian
    assert torch.equal(H, H.T)  # the lower triangle mirrored exactly
    assert torch.allclose(H.double(), 2 * ref / 120, rtol=1e-5, atol=1e-5)
    assert torch.equal(before, H)
    assert torch.allclose(st.imatrix.double(), torch.diag(ref) / 120, rtol=1e-5)
    assert st.n == 120 and st.sample == []


def test_blocked_scoring_is_the_whole_matrix_scoring(monkeypatch):
    """KLD scoring and the base encoding run SCORE_ROWS positions at a time: the same bytes as all rows at once."""
    from quantprism.evaluate import kld

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 2000)).astype(np.float32) * 3
    nxt = rng.integers(0, 2000, 300)
    other = logits + rng.normal(size=logits.shape).astype(np.float32) * 0.3
    runs = []
    for rows in (10**9, 64, 7):
        monkeypatch.setattr(kld, "SCORE_ROWS", rows)
        base = kld.BaseLogprobs.from_logits(logits, nxt)
        runs.append((base, kld.score_tokens(base, other[100:250], slice(100, 250))))
    (b0, s0), *rest = runs
    for b, s in rest:
        for f in ("scale", "min_log_prob", "q", "next_tokens"):
            assert np.array_equal(getattr(b, f), getattr(b0, f)), f
        for f in ("kld", "nll", "nll_base", "same_top", "p_diff"):
            assert np.array_equal(getattr(s, f), getattr(s0, f)), f
    assert s0.kld.shape == (150,) and (s0.kld > 0).all()
