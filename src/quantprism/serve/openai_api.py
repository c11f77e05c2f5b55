"""OpenAI request parsing and response shapes (/v1/completions, /v1/chat/completions).

Parsing is explicit (not a pydantic model) so every bad request gets OpenAI's error body with the offending
``param``: malformed JSON, wrong types, out-of-range values, and features this server does not implement
(n > 1, logprobs, echo, best_of, tools) are refused with 400 rather than silently ignored. Unknown keys are
ignored, as OpenAI-compatible servers do (clients send vendor extras such as ``stream_options``).
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class GenRequest:
    kind: str  # "completion" | "chat"
    model: str | None
    prompt: str | None = None  # completions: text
    prompt_ids: list[int] | None = None  # completions: token ids given directly
    messages: list[dict] = field(default_factory=list)  # chat
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    user: str | None = None

    @property
    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


def _num(body: dict, key: str, lo: float, hi: float, default, integer: bool = False):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not float(v).is_integer()):
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}", key)
    if not lo <= v <= hi:
        raise BadRequest(f"'{key}' must be between {lo:g} and {hi:g}, got {v}", key)
    return int(v) if integer else float(v)


def parse(raw: bytes, kind: str, max_new_default: int) -> GenRequest:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", "model")
    req = GenRequest(kind=kind, model=model)
    for key, ok in (("n", lambda v: v in (None, 1)), ("best_of", lambda v: v in (None, 1)),
                    ("echo", lambda v: v in (None, False)), ("logprobs", lambda v: v in (None, False)),
                    ("top_logprobs", lambda v: v in (None, 0)), ("tools", lambda v: not v),
                    ("functions", lambda v: not v), ("suffix", lambda v: v in (None, ""))):
        if not ok(body.get(key)):
            raise BadRequest(f"'{key}' = {json.dumps(body.get(key))[:40]} is not supported by this server", key,
                             "unsupported_parameter")
    if kind == "completion":
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            req.prompt = p
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p):
            req.prompt_ids = [int(t) for t in p]
        else:
            raise BadRequest("'prompt' must be a string (or one string in a list, or a list of token ids)", "prompt")
    else:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("'messages' must be a non-empty list of {role, content}", "messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer") \
                    or not isinstance(m.get("content"), str):
                raise BadRequest(f"messages[{i}] must be {{\"role\": system|user|assistant, \"content\": string}}",
                                 f"messages[{i}]")
        req.messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in msgs]
    mt = body.get("max_completion_tokens", body.get("max_tokens")) if kind == "chat" else body.get("max_tokens")
    req.max_tokens = _num({"max_tokens": mt}, "max_tokens", 1, 1 << 20, max_new_default, integer=True)
    req.temperature = _num(body, "temperature", 0.0, 2.0, 1.0)
    req.top_p = _num(body, "top_p", 0.0, 1.0, 1.0)
    if req.top_p == 0.0:
        req.temperature = 0.0  # the nucleus is the argmax
    seed = body.get("seed")
    if seed is not None:
        req.seed = _num(body, "seed", -(1 << 63), (1 << 63) - 1, None, integer=True) & ((1 << 63) - 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop)):
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    req.stop = stop or []
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be true or false", "stream")
    req.stream = bool(body.get("stream", False))
    so = body.get("stream_options")
    req.include_usage = bool(isinstance(so, dict) and so.get("include_usage"))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest("'user' must be a string", "user")
    req.user = user or None
    return req


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(kind: str, rid: str, arm: str, text: str, finish: str, n_prompt: int, n_out: int) -> dict:
    created = int(time.time())
    if kind == "chat":
        return {"id": rid, "object": "chat.completion", "created": created, "model": arm,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                             "logprobs": None}], "usage": usage(n_prompt, n_out)}
    return {"id": rid, "object": "text_completion", "created": created, "model": arm,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": usage(n_prompt, n_out)}


def chunk(kind: str, rid: str, arm: str, text: str | None, finish: str | None, first: bool = False) -> dict:
    created = int(time.time())
    if kind == "chat":
        delta: dict = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": arm,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    return {"id": rid, "object": "text_completion", "created": created, "model": arm,
            "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}


def sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
