"""The OpenAI-compatible server in front of the arms (FastAPI; run by uvicorn in `quantprism serve`).

Per request: parse (400 on anything malformed) → tokenize with the original model's tokenizer (the build's parity
gate proved each runtime tokenizes the same way; one tokenization also makes the shadow compare token-exact) →
route by the flag (re-read when the file changed) → the arm's runtime process → response whose ``model`` names
the arm. Overload → 429 + Retry-After, no answer within ``timeout_s`` → 504, a candidate that went down → the
request is re-run on the baseline (non-streaming, or streaming before its first byte). Shadow compares run after
the client's response is complete, only on an idle candidate, one at a time: they never delay or change it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import openai_api as oa
from .arms import Arm, ArmDown, Overloaded
from .flag import FlagState, FlagWatcher
from .metrics import Metrics
from .router import USER_HEADER, Router
from .shadow import ShadowLog, compare

log = logging.getLogger(__name__)


class Server:
    def __init__(self, build_dir: Path, arms: dict[str, Arm], state: FlagState, tokenizer, n_ctx: int = 1024,
                 timeout_s: float = 60.0, max_new_default: int = 16, alias: str | None = None, router: Router | None = None):
        self.build_dir = Path(build_dir)
        self.arms = arms
        self.flag = FlagWatcher(self.build_dir, state)
        self.tok = tokenizer
        self.n_ctx = n_ctx
        self.timeout_s = timeout_s
        self.max_new_default = max_new_default
        self.alias = alias or "quantprism"
        self.router = router or Router()
        self.metrics = Metrics()
        self.shadow_log = ShadowLog(self.build_dir / "serve" / "shadow.jsonl")
        self._shadow_busy = False
        self._tasks: set[asyncio.Task] = set()
        self._plain = self._plain_encoder()
        self._bos = self._bos_id()
        for name, arm in arms.items():
            self.metrics.queue.labels(name).set_function(lambda a=arm: a.depth)
            self.metrics.up.labels(name).set_function(lambda a=arm: 1.0 if a.up else 0.0)

    def _plain_encoder(self):
        """text → ids without special tokens. The Rust tokenizer straight (a tenth of the Python wrapper's ~0.4 ms per
        call) when it gives the wrapper's ids on a probe set; the wrapper otherwise (slow tokenizers, Python-side
        normalisation)."""
        slow = lambda text: list(self.tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        rust = getattr(self.tok, "backend_tokenizer", None)
        if rust is None:
            return slow
        fast = lambda text: rust.encode(text, add_special_tokens=False).ids  # noqa: E731
        probes = ("a", "Hello, world!", "  two  spaces\n\ttab", "naïve café 東京 🙂", "x = [1, 22, 333]; # 4444",
                  "<|endoftext|> and </s> as text", "")
        return fast if all(fast(t) == slow(t) for t in probes) else slow

    def _bos_id(self) -> int | None:
        """The BOS the original tokenizer puts before plain text (None if it adds none)."""
        with_special = self.tok("a", add_special_tokens=True)["input_ids"]
        plain = self.tok("a", add_special_tokens=False)["input_ids"]
        return with_special[0] if len(with_special) > len(plain) and with_special[1:] == plain else None

    # prompt -> ids ------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """A completion prompt's ids: the original tokenizer's, with the BOS it puts before plain text."""
        ids = self._plain(text)
        return ids if self._bos is None else [self._bos, *ids]

    def prompt_ids(self, req: oa.GenRequest) -> list[int]:
        if req.kind == "chat":
            if not getattr(self.tok, "chat_template", None):
                raise oa.BadRequest("this model has no chat template; use /v1/completions", "messages", "no_chat_template")
            text = self.tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            ids = self._plain(text)  # the template writes its own BOS
        elif req.prompt_ids is not None:
            vocab = len(self.tok)
            if max(req.prompt_ids) >= vocab:
                raise oa.BadRequest(f"token id {max(req.prompt_ids)} is outside the vocabulary ({vocab})", "prompt")
            ids = list(req.prompt_ids)
        else:
            ids = self.encode(req.prompt)
        if not ids:
            raise oa.BadRequest("the prompt is empty", "prompt")
        if len(ids) + req.max_tokens > self.n_ctx:
            raise oa.BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceed the context "
                                f"length {self.n_ctx}", "max_tokens", "context_length_exceeded")
        return ids

    # routing ------------------------------------------------------------------------------------------------------
    def pick(self, req: oa.GenRequest, header_user: str | None):
        state = self.flag.current()
        m = self.metrics
        m.share.set(state.share)
        m.shadow_share.set(state.shadow)
        m.flag_version.set(state.version)
        if req.model in self.arms and req.model != self.alias:  # pinned by name (evaluation, debugging): no fallback
            return req.model, False, state, True
        cand = self.arms.get(state.candidate)
        route = self.router.route(state, req.user or header_user, cand is not None and cand.up)
        return route.arm, route.shadow, state, False

    # endpoints ----------------------------------------------------------------------------------------------------
    async def generate(self, request: Request, kind: str) -> Response:
        t0 = time.perf_counter()
        endpoint = "chat" if kind == "chat" else "completions"
        try:
            req = oa.parse(await request.body(), kind, self.max_new_default)
            if req.model is not None and req.model not in self.arms and req.model != self.alias:
                raise oa.BadRequest(f"model {req.model!r} is not served here; use {self.alias!r} (routed by the flag) "
                                    f"or an arm: {', '.join(self.arms)}", "model", "model_not_found")
            ids = self.prompt_ids(req)
        except oa.BadRequest as e:
            self.metrics.errors.labels("-", "bad_request").inc()
            self.metrics.requests.labels("-", endpoint, "400").inc()
            return JSONResponse(oa.error_body(str(e), param=e.param, code=e.code), status_code=400)
        arm_name, shadow, state, pinned = self.pick(req, request.headers.get(USER_HEADER))
        fallback = None if pinned or arm_name == state.baseline else state.baseline
        rid = oa.new_id(kind)
        if req.stream:
            return await self._stream(req, ids, arm_name, shadow, state, rid, endpoint, t0, fallback)
        return await self._complete(req, ids, arm_name, shadow, state, rid, endpoint, t0, fallback)

    def _refuse(self, e: Exception, arm: str, endpoint: str) -> JSONResponse:
        """The HTTP answer to an arm's refusal: 429 overload, 504 timeout, 503 down, 500 runtime error."""
        if isinstance(e, Overloaded):
            return self._fail(arm, endpoint, 429, "overload", f"{e}; retry after {e.retry_after} s",
                              {"Retry-After": str(e.retry_after)}, "rate_limit_exceeded")
        if isinstance(e, TimeoutError):
            return self._fail(arm, endpoint, 504, "timeout", f"no answer from arm {arm} within {self.timeout_s:g} s")
        if isinstance(e, ArmDown):
            return self._fail(arm, endpoint, 503, "down", str(e))
        return self._fail(arm, endpoint, 500, "runtime", f"arm {arm}: {e}")

    def _fail(self, arm: str, endpoint: str, status: int, kind: str, message: str, headers: dict | None = None,
              etype: str = "server_error") -> JSONResponse:
        self.metrics.errors.labels(arm, kind).inc()
        self.metrics.requests.labels(arm, endpoint, str(status)).inc()
        return JSONResponse(oa.error_body(message, etype, code=kind), status_code=status, headers=headers)

    async def _run(self, arm: Arm, req: oa.GenRequest, ids: list[int], keep_rows: bool) -> dict:
        async def go():
            async for msg in arm.generate(ids, req.max_tokens, req.sampling, req.stop, False, keep_rows=keep_rows):
                if "done" in msg:
                    return msg
        return await asyncio.wait_for(go(), self.timeout_s)

    async def _complete(self, req, ids, arm_name, shadow, state, rid, endpoint, t0, fallback) -> Response:
        arm = self.arms[arm_name]
        try:
            try:
                msg = await self._run(arm, req, ids, shadow)
            except ArmDown:
                if fallback is None or fallback not in self.arms:
                    raise
                log.warning("arm %s went down mid-request; re-running it on the baseline %s", arm_name, fallback)
                arm_name, arm, shadow = fallback, self.arms[fallback], False
                msg = await self._run(arm, req, ids, False)
        except (Overloaded, TimeoutError, ArmDown, RuntimeError) as e:
            return self._refuse(e, arm_name, endpoint)
        done = msg["done"]
        self._account(arm_name, endpoint, len(ids), done, t0)
        if shadow:
            self._spawn_shadow(req, ids, done, msg.get("array"), state)
        return JSONResponse(oa.response(req.kind, rid, arm_name, done["text"], done["finish_reason"], len(ids),
                                        len(done["tokens"])),
                            headers={"X-Quantprism-Runtime-Seconds": f"{done['seconds']:.6f}"})  # time in the runtime

    async def _stream(self, req, ids, arm_name, shadow, state, rid, endpoint, t0, fallback) -> Response:
        arm = self.arms[arm_name]
        try:  # admission happens before the 200: overload and a down arm are still proper HTTP errors
            agen = arm.generate(ids, req.max_tokens, req.sampling, req.stop, True, keep_rows=shadow)
            first = await asyncio.wait_for(agen.__anext__(), self.timeout_s)
        except (Overloaded, TimeoutError, ArmDown, RuntimeError) as e:
            if isinstance(e, ArmDown) and fallback is not None and fallback in self.arms and self.arms[fallback].up:
                return await self._stream(req, ids, fallback, False, state, rid, endpoint, t0, None)
            return self._refuse(e, arm_name, endpoint)

        async def body():
            status = "200"
            try:
                if req.kind == "chat":
                    yield oa.sse(oa.chunk(req.kind, rid, arm_name, None, None, first=True))
                msg = first
                while True:
                    if "text" in msg and msg["text"]:
                        yield oa.sse(oa.chunk(req.kind, rid, arm_name, msg["text"], None))
                    if "done" in msg:
                        done = msg["done"]
                        yield oa.sse(oa.chunk(req.kind, rid, arm_name, None, done["finish_reason"]))
                        if req.include_usage:
                            yield oa.sse({"id": rid, "object": "chat.completion.chunk" if req.kind == "chat" else
                                          "text_completion", "created": int(time.time()), "model": arm_name,
                                          "choices": [], "usage": oa.usage(len(ids), len(done["tokens"]))})
                        yield oa.sse("[DONE]")
                        self._account(arm_name, endpoint, len(ids), done, t0, count=False)
                        if shadow:
                            self._spawn_shadow(req, ids, done, msg.get("array"), state)
                        return
                    msg = await asyncio.wait_for(agen.__anext__(), self.timeout_s)
            except TimeoutError:
                status = "504"
                self.metrics.errors.labels(arm_name, "timeout").inc()
                yield oa.sse(oa.error_body(f"arm {arm_name} stopped answering within {self.timeout_s:g} s", code="timeout"))
            except (ArmDown, RuntimeError) as e:
                status = "503" if isinstance(e, ArmDown) else "500"
                self.metrics.errors.labels(arm_name, "down" if isinstance(e, ArmDown) else "runtime").inc()
                yield oa.sse(oa.error_body(f"arm {arm_name}: {e}", code="down" if status == "503" else "runtime"))
            finally:
                self.metrics.requests.labels(arm_name, endpoint, status).inc()

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _account(self, arm: str, endpoint: str, n_prompt: int, done: dict, t0: float, count: bool = True) -> None:
        m = self.metrics
        if count:
            m.requests.labels(arm, endpoint, "200").inc()
        m.tokens.labels(arm, "prompt").inc(n_prompt)
        m.tokens.labels(arm, "completion").inc(len(done["tokens"]))
        m.latency.labels(arm).observe(time.perf_counter() - t0)
        m.ttft.labels(arm).observe(done.get("ttft_s", 0.0))

    # shadow -------------------------------------------------------------------------------------------------------
    def _spawn_shadow(self, req, ids, done, base_rows, state: FlagState) -> None:
        task = asyncio.get_running_loop().create_task(self._shadow(req, ids, done, base_rows, state))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(self, req, ids, done, base_rows, state: FlagState) -> None:
        rec = {"baseline": state.baseline, "candidate": state.candidate, "flag_version": state.version,
               "prompt_tokens": len(ids), "sampled": req.sampling["temperature"] > 0}
        cand = self.arms.get(state.candidate)
        if self._shadow_busy or cand is None or not cand.up or cand.depth:
            self.metrics.shadow.labels("skipped").inc()
            self.shadow_log.write({**rec, "skipped": "candidate busy or down"})
            return
        self._shadow_busy = True
        try:
            out = None
            async for msg in cand.generate(ids, req.max_tokens, req.sampling, req.stop, False, queue_limit=0):
                out = msg
            forced = None
            if base_rows is not None and done["tokens"]:
                forced = (await cand.call("logits", queue_limit=0, ids=[*ids, *done["tokens"]]))["array"]
            rec.update(compare(len(ids), done["tokens"], out["done"]["tokens"], base_rows, forced))
            if base_rows is None:
                rec["kld_mean"] = None
                rec["kld_note"] = "the baseline's runtime does not expose its sampled rows (vLLM)"
        except Overloaded:
            self.metrics.shadow.labels("skipped").inc()
            self.shadow_log.write({**rec, "skipped": "candidate got busy"})
            return
        except Exception as e:  # a shadow failure is recorded, never raised into the server
            self.metrics.shadow.labels("failed").inc()
            self.shadow_log.write({**rec, "skipped": f"failed: {type(e).__name__}: {str(e)[:200]}"})
            return
        finally:
            self._shadow_busy = False
        m = self.metrics
        m.shadow.labels("compared").inc()
        if rec["exact_match"]:
            m.shadow_match.inc()
        if rec.get("first_divergence") is not None:
            m.shadow_divergence.observe(rec["first_divergence"])
        if rec.get("kld_mean") is not None:
            m.shadow_kld.observe(rec["kld_mean"])
        self.shadow_log.write(rec)

    # health -------------------------------------------------------------------------------------------------------
    def health(self) -> tuple[int, dict]:
        state = self.flag.current()
        arms = {n: {"up": a.up, "reason": a.down_reason, "queue_depth": a.depth, "runtime": a.spec.runtime,
                    "artifact": str(a.spec.artifact), **{k: a.info.get(k) for k in ("kernel", "threads", "pid")}}
                for n, a in self.arms.items()}
        base_up = state.baseline in self.arms and self.arms[state.baseline].up
        cand_up = state.candidate in self.arms and self.arms[state.candidate].up
        status = "ok" if base_up and cand_up else ("degraded" if base_up else "down")
        body = {"status": status, "flag": {k: getattr(state, k) for k in ("baseline", "candidate", "share", "shadow",
                                                                          "version", "changed_by", "reason")},
                "arms": arms}
        return (200 if base_up else 503), body

    def app(self) -> FastAPI:
        import contextlib

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI):
            for arm in self.arms.values():  # the loop reads each arm's pipe: a dead worker shows without traffic
                arm.attach()
            yield

        app = FastAPI(title="quantprism serve", docs_url=None, redoc_url=None, lifespan=lifespan)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self.generate(request, "completion")

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self.generate(request, "chat")

        @app.get("/v1/models")
        async def models():
            now = int(time.time())
            data = [{"id": self.alias, "object": "model", "created": now, "owned_by": "quantprism"}]
            data += [{"id": n, "object": "model", "created": now, "owned_by": "quantprism",
                      "runtime": a.spec.runtime, "up": a.up} for n, a in self.arms.items()]
            return {"object": "list", "data": data}

        @app.get("/healthz")
        async def healthz():
            code, body = self.health()
            return JSONResponse(body, status_code=code)

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

        @app.exception_handler(Exception)
        async def crash_guard(request: Request, exc: Exception):  # never a traceback to the client, never down
            log.exception("unhandled error on %s", request.url.path)
            return JSONResponse(oa.error_body(f"internal error: {type(exc).__name__}"), status_code=500)

        return app
