"""Per-linear-input statistics collected during the calibration forward of one decoder layer.

Linears that read the same input share one record (q/k/v read the attention norm's output,
gate/up the MLP norm's output): one Hessian ``H = 2·XᵀX/n``, the imatrix (mean x² per input
channel, = diag(H)/2), the per-channel |x| max, and a bounded token sample kept for the
transform searches (AWQ / SmoothQuant).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..memory import narrow_to_float32_
from ..model.archs import LLAMA

# input group → the linears reading it (Llama's; each architecture's own: model/archs.py Arch.groups)
INPUT_GROUPS = LLAMA.input_groups
XTX_BLOCK_BYTES = 32 << 20  # the largest float32 partial product of one batch's XᵀX
XTX_BLOCK_COLS = 512  # column block of the triangular XᵀX accumulation (2048 wide: 5/8 of the full product's flops)


@dataclass
class InputStats:
    dim: int
    sample_tokens: int = 4096
    xtx: torch.Tensor = field(init=False)
    absmax: torch.Tensor = field(init=False)
    n: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)
    _kept: int = 0
    cross: bool = False  # also accumulate X̃ᵀX: these inputs against the fp model's inputs (fp targets)
    xc: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.xtx = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        self.absmax = torch.zeros(self.dim)
        if self.cross:
            self.xc = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def add(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.cross:
            if x_fp is None:
                raise ValueError("cross statistics need the fp model's inputs of the same tokens")
            xf = x_fp.reshape(-1, x_fp.shape[-1]).float().to(x.device)
            self.xc = self.xc.to(x.device)
            cols = max(1, min(XTX_BLOCK_COLS, XTX_BLOCK_BYTES // (4 * self.dim)))
            for a in range(0, self.dim, cols):
                self.xc[:, a : a + cols] += x.T @ xf[:, a : a + cols]
        if self.xtx.device != x.device:  # accumulate where the layer runs (a GPU with --device cuda)
            self.xtx, self.absmax = self.xtx.to(x.device), self.absmax.to(x.device)
        # fp32 per batch, fp64 across batches, added in place a column block at a time: the fp32 product of a wide
        # input (in² × 4 bytes, 127 MB at 5632) is never whole
        # XᵀX is symmetric: only the upper triangle is accumulated (rows ≤ each column block's last), in blocks of
        # ≤ XTX_BLOCK_COLS columns — about half the flops; the lower triangle is mirrored once, in ``to_cpu``
        cols = max(1, min(XTX_BLOCK_COLS, XTX_BLOCK_BYTES // (4 * self.dim)))
        for a in range(0, self.dim, cols):
            b = min(self.dim, a + cols)
            self.xtx[:b, a:b] += x[:, :b].T @ x[:, a:b]
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.n += x.shape[0]
        if self._kept < self.sample_tokens:
            # an evenly spaced token subset of every batch keeps the sample representative
            take = min(self.sample_tokens - self._kept, max(1, x.shape[0] // 8))
            idx = torch.linspace(0, x.shape[0] - 1, take).long()
            self.sample.append(x[idx.to(x.device)].cpu())
            self._kept += take

    def to_cpu(self) -> InputStats:
        """After the layer's forward: the Hessian and imatrix are taken in float32 on the CPU (where the solvers run)
        and the float64 accumulator, a layer's largest buffer (in² × 8 bytes), is dropped."""
        n = max(1, self.n)
        _mirror_upper_(self.xtx)
        self._imatrix = (torch.diag(self.xtx) / n).float().cpu()
        h = self.xtx.mul_(2.0).div_(n)  # = (2·xtx / n) in fp64, rounded once
        # on the CPU the float32 Hessian is written over the accumulator's first half (no second buffer at the peak)
        self._hessian = narrow_to_float32_(h) if h.device.type == "cpu" and h.is_contiguous() else h.float().cpu()
        self.xtx = None  # type: ignore[assignment]
        if self.xc is not None:
            self._cross = (self.xc.mul_(2.0).div_(n)).float().cpu()  # on the Hessian's scale: 2·X̃ᵀX/n
            self.xc = None
        self.absmax = self.absmax.cpu()
        return self

    @property
    def cross_hessian(self) -> torch.Tensor | None:
        """2·X̃ᵀX/n (quantized-model inputs × fp-model inputs), when collected."""
        return getattr(self, "_cross", None)

    @property
    def hessian(self) -> torch.Tensor:
        if self.xtx is None:
            return self._hessian
        return (2.0 * _mirror_upper_(self.xtx.clone()) / max(1, self.n)).float()

    @property
    def imatrix(self) -> torch.Tensor:
        if self.xtx is None:
            return self._imatrix
        return (torch.diag(self.xtx) / max(1, self.n)).float()

    @property
    def x_sample(self) -> torch.Tensor:
        return torch.cat(self.sample, 0) if self.sample else torch.zeros(0, self.dim)


def _mirror_upper_(a: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Copy the upper triangle of a square matrix onto its lower one, in place (a block of rows at a time)."""
    n = a.shape[0]
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        d = a[r0:r1, r0:r1]
        d.copy_(torch.triu(d) + torch.triu(d, 1).T)
        a[r1:, r0:r1] = a[r0:r1, r1:].T
    return a


class Pairing:
    """Switch for a pass that also runs the fp model's inputs through the layer: while ``fp`` is set a forward adds
    nothing to the statistics (with ``cross`` it records each group's input, and the next forward on the quantized
    model's inputs of the same tokens accumulates X̃ᵀX against them)."""

    def __init__(self, cross: bool = True) -> None:
        self.fp = False
        self.cross = cross
        self.ref: dict[str, torch.Tensor] = {}


def attach_collectors(layer: torch.nn.Module, sample_tokens: int = 4096,
                      groups: dict[str, tuple[str, ...]] | None = None,
                      pairing: Pairing | None = None) -> tuple[dict[str, InputStats], list]:
    """Forward pre-hooks on the first linear of each input group (the architecture's ``groups``, Llama's by
    default); returns (stats, hook handles). ``pairing``: also collect X̃ᵀX against the fp model's inputs."""
    stats: dict[str, InputStats] = {}
    handles = []
    for group, lins in (groups or INPUT_GROUPS).items():
        mod = layer.get_submodule(lins[0])
        st = InputStats(mod.in_features, sample_tokens, cross=pairing is not None and pairing.cross)
        stats[group] = st

        def hook(_m, args, st=st, group=group):
            if pairing is None or not (pairing.fp or pairing.cross):
                st.add(args[0].detach())
            elif pairing.fp:
                if pairing.cross:
                    pairing.ref[group] = args[0].detach()
            else:
                st.add(args[0].detach(), pairing.ref.pop(group))

        handles.append(mod.register_forward_pre_hook(hook))
    return stats, handles


def fp_imatrix(model: torch.nn.Module, input_ids, batch: int = 8) -> dict[str, torch.Tensor]:
    """Mean x² per input channel of every Linear over the calibration tokens, from the ORIGINAL model.

    This is what llama-imatrix computes (on the fp model, all layers at once); it feeds llama.cpp's
    own quantizer as the "llama.cpp + imatrix" baseline.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(_m, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            handles.append(mod.register_forward_pre_hook(hook))
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    try:
        with torch.inference_mode():
            for i in range(0, ids.shape[0], batch):
                model(ids[i : i + batch])
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}
