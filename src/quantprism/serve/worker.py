"""One arm's runtime in its own process: opens the artifact through the runtime registry, then serves requests.

Why a process per arm: the runtimes are native code (llama.cpp, ONNX Runtime, vLLM's engine); one that crashes or
aborts on some input must take out only its arm, not the server, and vLLM wants its engine in the main thread of
its own process. The wire is a multiprocessing pipe carrying JSON (``send_bytes``), never pickles; logits travel
as a JSON header followed by the raw float32 bytes.

The server writes the next request only after the previous one's final message, so this process reads its pipe on
its main thread, between requests. Messages in: {"op": "generate", "id", "ids", "max_tokens", "sampling": {...}, "stream": bool, "stop": [...]},
{"op": "logits", "id", "ids"}, {"op": "tokenize", "id", "text"}, {"op": "quit"}.
Messages out: {"ready": {...}} once, then per request {"id", "token", "text"} (streaming), {"id", "done": {...}},
{"id", "logits": [T, V]} + bytes, {"id", "ids"}, or {"id", "error"}. {"fatal"} when the session cannot open.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _send(conn, msg: dict) -> None:
    conn.send_bytes(json.dumps(msg).encode())


def _text_until_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = [text.index(s) for s in stop if s and s in text]
    return (text[: min(cut)], True) if cut else (text, False)


def _generate(sess, conn, req: dict) -> None:
    from ..runtimes.base import Sampling

    rid, stop, stream = req["id"], list(req.get("stop") or []), bool(req.get("stream"))
    sampling = Sampling(**(req.get("sampling") or {}))
    t0 = time.perf_counter()
    ttft = None
    tokens: list[int] = []
    sent = ""  # text already streamed (a token may complete a multi-byte character later)
    finish = "length"
    hold = max((len(s) for s in stop), default=0)  # keep back what could still become a stop sequence
    keep = [] if req.get("keep_rows") and _can_keep_rows(sess) else None
    it = sess.stream(req["ids"], int(req["max_tokens"]), sampling, rows=keep) if keep is not None else \
        sess.stream(req["ids"], int(req["max_tokens"]), sampling)
    per_token = stream or bool(stop)  # otherwise the text is decoded once, at the end
    for tok in it:
        if ttft is None:
            ttft = time.perf_counter() - t0
        tokens.append(tok)
        if not per_token:
            continue
        text = sess.detokenize(tokens)
        text, stopped = _text_until_stop(text, stop)
        if stopped:
            finish = "stop"
        if stream:
            safe = text if stopped else text[: max(len(sent), len(text) - hold)]
            if safe.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for the next token
                safe = safe.rstrip("\ufffd")
            if len(safe) > len(sent) and safe.startswith(sent):
                _send(conn, {"id": rid, "text": safe[len(sent):]})
                sent = safe
        if stopped:
            break
    else:
        if len(tokens) < int(req["max_tokens"]):
            finish = "stop"  # EOS
    text = _text_until_stop(sess.detokenize(tokens), stop)[0] if tokens else ""
    if stream and len(text) > len(sent) and text.startswith(sent):
        _send(conn, {"id": rid, "text": text[len(sent):]})
    done = {"tokens": tokens, "text": text, "finish_reason": finish, "ttft_s": ttft or 0.0,
            "seconds": time.perf_counter() - t0}
    if keep:  # the rows each token was drawn from: [n, V] float32 after the JSON message
        import numpy as np

        rows = np.ascontiguousarray(np.stack(keep[: len(tokens)]), dtype=np.float32)
        _send(conn, {"id": rid, "done": done, "logits": list(rows.shape)})
        conn.send_bytes(rows.tobytes())
    else:
        _send(conn, {"id": rid, "done": done})


def _can_keep_rows(sess) -> bool:
    """Step-driven sessions (base.GreedySession) hand out the rows they sampled from; vLLM's scheduler does not."""
    from ..runtimes.base import GreedySession

    return isinstance(sess, GreedySession)


def worker_main(conn, runtime: str, artifact: str, threads: int | None, n_ctx: int) -> None:
    """Process entry point (spawned): open the session, report ready, serve until "quit" or EOF."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from ..runtimes import open_runtime

    try:
        sess = open_runtime(runtime, Path(artifact), threads=threads, n_ctx=n_ctx)
    except Exception as e:  # reported to the server, which refuses to start (or takes the arm out)
        _send(conn, {"fatal": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"})
        return
    eos = sess.eos if isinstance(sess.eos, set | list | tuple) else {sess.eos}
    _send(conn, {"ready": {"runtime": sess.runtime, "kernel": sess.kernel, "threads": sess.threads, "pid": os.getpid(),
                           "eos": sorted(int(e) for e in eos if e is not None)}})
    while True:  # the server sends one request at a time (serve/arms.py keeps the queue), so reading here never lags
        try:
            req = json.loads(conn.recv_bytes())
        except (EOFError, OSError, ValueError):
            break
        op = req.get("op")
        if op == "quit":
            break
        try:
            if op == "generate":
                _generate(sess, conn, req)
            elif op == "logits":
                import numpy as np

                rows = np.ascontiguousarray(sess.logits(req["ids"]), dtype=np.float32)
                _send(conn, {"id": req["id"], "logits": list(rows.shape)})
                conn.send_bytes(rows.tobytes())
            elif op == "tokenize":
                _send(conn, {"id": req["id"], "ids": sess.tokenize(req["text"])})
            else:
                _send(conn, {"id": req.get("id"), "error": f"unknown op {op!r}"})
        except (EOFError, BrokenPipeError):
            break
        except Exception as e:  # one request failed; the session stays up
            _send(conn, {"id": req.get("id"), "error": f"{type(e).__name__}: {str(e)[:300]}"})
    try:
        sess.close()
    except Exception:
        pass
