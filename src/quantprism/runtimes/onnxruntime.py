"""ONNX Runtime adapter: open an exported ONNX directory, greedy KV-cache generation, teacher-forced logits.

The graph takes input_ids, attention_mask (past + current), position_ids and past_key_values.N.key/
value, and returns logits and present.N.key/value: prefill is one run from an empty past, each decode
step one run with the previous presents fed back. present → past is matched by exact name
(a substring match on "key" would also hit "past_key_values.N.value"). KV geometry and special
tokens come from the model's own metadata (quantprism.* properties), tokenization from the HF
tokenizer files copied next to model.onnx.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, RuntimeUnavailable
from .base import GreedySession, HFTokenizerSession, import_probe

MODEL_FILE = "model.onnx"
OPT_LEVELS = ("disable", "basic", "extended", "all")


def available() -> tuple[bool, str]:
    return import_probe("onnxruntime", "onnxruntime", "pip install -e .[onnx]")


def _model_path(path: Path) -> Path:
    path = Path(path)
    model = path / MODEL_FILE if path.is_dir() else path
    if not model.is_file():
        raise ArtifactError(f"{path}: no {MODEL_FILE}; export the ONNX artifact first")
    return model


def check_onnx(path: Path) -> dict:
    """Structural check without building a session: protobuf parses, every external-data file is there and long enough."""
    import onnx
    from google.protobuf.message import DecodeError

    model = _model_path(path)
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{model}: corrupt or truncated ONNX file ({type(e).__name__}); re-export it") from None
    if not proto.graph.node:
        raise ArtifactError(f"{model}: the ONNX graph is empty; re-export it")
    need: dict[str, int] = {}
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            kv = {e.key: e.value for e in t.external_data}
            try:
                end = int(kv.get("offset", 0)) + int(kv.get("length", 0))
            except ValueError:
                raise ArtifactError(f"{model}: tensor {t.name[:80]}: malformed external-data offset/length; re-export it") from None
            if "location" not in kv:
                raise ArtifactError(f"{model}: tensor {t.name[:80]}: external data without a location; re-export it")
            need[kv["location"]] = max(need.get(kv["location"], 0), end)
    root = model.parent.resolve()
    for loc, end in sorted(need.items()):
        f = model.parent / loc
        if not f.resolve().is_relative_to(root):  # "../../etc/passwd" would have ORT read any file
            raise ArtifactError(f"{model}: external data location {loc[:120]!r} points outside the model folder; refusing it")
        if not f.is_file():
            raise ArtifactError(f"{model}: external data file {loc} is missing; copy it next to {MODEL_FILE} or re-export")
        if f.stat().st_size < end:
            raise ArtifactError(f"{f}: truncated external data ({f.stat().st_size} bytes, tensors need {end}); re-export it")
    ops = sorted({f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in proto.graph.node})
    return {"nodes": len(proto.graph.node), "ops": ops, "external_data": sorted(need)}


class OnnxRuntimeSession(HFTokenizerSession, GreedySession):
    """One loaded ONNX decoder. ``logits`` is teacher-forced (one run from an empty past); ``generate`` is greedy."""

    runtime = "onnxruntime"
    kernel = "native"

    def __init__(self, path: Path, threads: int | None = None, opt_level: str = "all", spinning: bool = True):
        ok, why = available()
        if not ok:
            raise RuntimeUnavailable(why)
        import onnxruntime as ort

        if opt_level not in OPT_LEVELS:
            raise ValueError(f"opt_level {opt_level!r}: use one of {', '.join(OPT_LEVELS)}")
        model = _model_path(path)
        self.root = model.parent
        self.threads = threads or min(os.cpu_count() or 1, 8)
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[opt_level]
        # spinning trades idle CPU for lower latency between decode steps; off when cores are shared
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        so.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises assorted errors; find the cause, then say it in one line
            check_onnx(model)
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{model}: ONNX Runtime cannot load it ({first}); re-export it") from None
        meta = self.sess.get_modelmeta().custom_metadata_map
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.has_position_ids = "position_ids" in self.inputs
        self.present = ["present." + n.removeprefix("past_key_values.") for n in self.past]
        missing = [p for p in self.present if p not in self.outputs]
        if missing or "logits" not in self.outputs or "input_ids" not in self.inputs:
            raise ArtifactError(f"{model}: not a KV-cache decoder graph (outputs {self.outputs[:3]}…); re-export it")
        shapes = {i.name: i.shape for i in self.sess.get_inputs()}
        genai = self.root / "genai_config.json"  # onnxruntime-genai graphs leave head_size symbolic
        dec = json.loads(genai.read_text()).get("model", {}).get("decoder", {}) if genai.is_file() else {}
        self.kv_heads = int(meta.get("quantprism.num_kv_heads", dec.get("num_key_value_heads", shapes[self.past[0]][1])))
        self.head_dim = int(meta.get("quantprism.head_dim", dec.get("head_size", shapes[self.past[0]][3])))
        self.eos = set(json.loads(meta.get("quantprism.eos_token_id", "[]")))

    def _empty_past(self) -> list[np.ndarray]:
        return [np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.past]

    def _step(self, ids: list[int], past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph run: logits [T, V] of ``ids`` after ``past``, and the presents (the next past)."""
        n_past = past[0].shape[2] if past else 0
        t = len(ids)
        feed = {"input_ids": np.asarray(ids, np.int64)[None], "attention_mask": np.ones((1, n_past + t), np.int64)}
        if self.has_position_ids:  # onnxruntime-genai graphs take none
            feed["position_ids"] = np.arange(n_past, n_past + t, dtype=np.int64)[None]
        feed.update(zip(self.past, past, strict=True))
        out = self.sess.run(["logits", *self.present], feed)
        return out[0][0], out[1:]

    def describe(self) -> str:
        facts = check_onnx(self.root)
        ext = facts["external_data"]
        return f"{facts['nodes']} nodes" + (f", external data {', '.join(ext)}" if ext else "")

    def logits(self, ids: list[int] | np.ndarray) -> np.ndarray:
        return np.asarray(self._step([int(i) for i in ids], self._empty_past())[0], np.float32)

    def continuation_logits(self, ctx: list[int], conts: list[list[int]]) -> list[np.ndarray]:
        """The rows that score each continuation after one shared prefill of ``ctx`` (multiple-choice tasks): each
        continuation runs from the context's presents (ORT never writes its inputs, so they are shared as is)."""
        logits, past = self._step([int(i) for i in ctx], self._empty_past())
        last = np.asarray(logits[-1:], np.float32)
        return [np.concatenate([last, np.asarray(self._step([int(i) for i in c[:-1]], past)[0], np.float32)])
                if len(c) > 1 else last.copy() for c in conts]

    def _prefill(self, ids: list[int], max_new: int) -> np.ndarray:
        logits, self._past = self._step(ids, self._empty_past())
        return logits[-1]

    def _decode(self, token: int) -> np.ndarray:
        logits, self._past = self._step([token], self._past)
        return logits[-1]

    def close(self) -> None:
        self.sess = None


def open_session(path: Path, threads: int | None = None, opt_level: str = "all", spinning: bool = True) -> OnnxRuntimeSession:
    return OnnxRuntimeSession(path, threads, opt_level, spinning)


def open_runtime_session(path: Path, threads: int | None, n_ctx: int) -> OnnxRuntimeSession:
    return OnnxRuntimeSession(path, threads)
