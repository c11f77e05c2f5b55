"""`quantprism inspect`: what a model is, and which deployment targets can be built from it."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..model.loader import ModelInfo, load_model_info


def _shape_rows(info: ModelInfo) -> list[tuple[str, str, str, str]]:
    """Tensor rows with per-layer tensors folded into one `model.layers.{0..N-1}.…` row."""
    groups: dict[str, list[Any]] = {}
    for name, t in sorted(info.tensors.items()):
        key = name
        if name.startswith("model.layers."):
            rest = name.split(".", 3)[3]
            key = f"model.layers.*.{rest}"
        groups.setdefault(key, []).append(t)
    rows = []
    for key, ts in groups.items():
        shapes = sorted({t.shape for t in ts})
        dtypes = sorted({t.dtype for t in ts})
        rows.append((key, " / ".join("×".join(map(str, s)) for s in shapes), ",".join(dtypes), str(len(ts))))
    return rows


def render_inspect(console: Any, path: str | None, targets_file: Path | None, calibration: str | None,
                   samples: int, seq_len: int, seed: int) -> None:
    from rich.table import Table

    info = load_model_info(path)
    cfg = info.config
    dtypes = Counter(t.dtype for t in info.tensors.values())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    summary = Table(show_header=False, title=f"{info.path}")
    for k, v in [
        ("architecture", info.architecture),
        ("parameters", f"{info.n_params:,} ({info.n_params / 1e6:.2f} M)"),
        ("layers", str(info.n_layers)),
        ("hidden / FFN", f"{cfg['hidden_size']} / {cfg['intermediate_size']}"),
        ("heads / KV heads / head_dim",
         f"{cfg['num_attention_heads']} / {cfg.get('num_key_value_heads', cfg['num_attention_heads'])} / {head_dim}"),
        ("vocab", str(cfg["vocab_size"])),
        ("rope theta", str(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))),
        ("embeddings", "tied" if info.tied_embeddings else "untied (own lm_head)"),
        ("dtypes", ", ".join(f"{d}×{n}" for d, n in sorted(dtypes.items()))),
        ("tokenizer", info.tokenizer_kind),
        ("weights sha256", info.weights_sha256),
    ]:
        summary.add_row(k, v)
    console.print(summary)

    from ..hardware import detect

    m = detect()
    mt = Table(show_header=False, title="this machine")
    for k, v in [("cpu", m.cpu), ("kind", m.kind), ("cores", str(m.cores)), ("isa", " ".join(m.isa)),
                 ("int8 GEMM", "AVX2 u8s8: int16 pair sums saturate (W8A8 weights in ±63 for cpu-avx2 targets)"
                  if m.int8_pairs_saturate else "VNNI: exact int32 accumulation (full-range W8A8 grids validate here)")]:
        mt.add_row(k, v)
    console.print(mt)

    shapes = Table(title="tensors")
    for col in ("name", "shape", "dtype", "count"):
        shapes.add_column(col)
    for row in _shape_rows(info):
        shapes.add_row(*row)
    console.print(shapes)

    if targets_file is not None:
        from ..config import check_target_against_model, parse_targets
        from ..exporters import FORMATS

        tf = parse_targets(targets_file)
        tt = Table(title=f"targets in {targets_file}")
        for col in ("target", "format", "scheme", "hardware", "applies", "why not", f"validates on this {m.kind}",
                    "shape notes"):
            tt.add_column(col)
        for t in tf.targets.values():
            why = check_target_against_model(t, info.linear_shapes)
            tt.add_row(t.name, t.format, t.scheme, t.hardware, "yes" if why is None else "no", why or "",
                       "yes" if m.matches(t.hardware) else "no (other arithmetic)",
                       FORMATS[t.format].shape_notes(t, info) if why is None else "")
        console.print(tt)

    if calibration is not None:
        from ..calibration import build_calibration
        from ..model.loader import load_tokenizer

        tok = load_tokenizer(info)
        cs = build_calibration(tok, calibration, samples, seq_len, seed,
                               max_positions=cfg.get("max_position_embeddings"))
        ct = Table(show_header=False, title="calibration set")
        for k, v in cs.record().items():
            ct.add_row(k, str(v))
        console.print(ct)
