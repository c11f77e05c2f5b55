"""An arm: one artifact in its own runtime process (serve/worker.py), with a bounded queue in front of it.

The worker runs one request at a time (a runtime session is one stream); ``max_queue`` more may wait. A request
beyond that is refused at once (the server answers 429 with Retry-After from the arm's recent service time) —
queueing without bound only turns overload into timeouts for everyone. If the process dies, every request in it
fails with ``ArmDown`` and the arm stays down (the router sends its traffic to the baseline).

The wire, for latency: the waiting requests stay here, and the pipe carries one request at a time, so a write
never waits on a busy worker and the worker reads on its own main thread. The event loop reads the pipe itself
(``add_reader``): no thread hop between the worker's answer and the request's coroutine.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import multiprocessing as mp
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class ArmDown(Exception):
    """The arm's runtime process is gone (or never came up)."""


class Overloaded(Exception):
    def __init__(self, arm: str, retry_after: int):
        super().__init__(f"arm {arm} is at its queue limit")
        self.retry_after = retry_after


@dataclass
class ArmSpec:
    name: str  # "original" or the target name
    runtime: str  # a runtimes.RUNTIMES name
    artifact: Path
    threads: int | None = None
    n_ctx: int = 1024
    max_queue: int = 16  # requests waiting behind the running one


@dataclass
class _Pending:
    events: asyncio.Queue
    kind: str
    wire: bytes  # the request as sent to the worker
    t0: float = field(default_factory=time.perf_counter)


class Arm:
    def __init__(self, spec: ArmSpec):
        self.spec = spec
        self.name = spec.name
        self.info: dict = {}
        self.down_reason: str | None = "not started"
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}  # in the worker (at most one) or waiting here, in arrival order
        self._waiting: deque[int] = deque()
        self._inflight: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop that reads the pipe
        self._service = deque(maxlen=64)  # recent seconds per generate, for Retry-After
        self.proc = None
        self.conn = None

    # lifecycle ---------------------------------------------------------------------------------------------------
    def start(self, timeout: float = 900.0) -> None:
        """Spawn the worker and wait until its session is open; raise ArmDown with the worker's reason if not."""
        from .worker import worker_main

        ctx = mp.get_context("spawn")  # a clean interpreter: no inherited threads, vLLM-safe
        parent, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=worker_main, name=f"quantprism-arm-{self.name}", daemon=True,
                                args=(child, self.spec.runtime, str(self.spec.artifact), self.spec.threads, self.spec.n_ctx))
        self.proc.start()
        child.close()
        self.conn = parent
        if not parent.poll(timeout):
            self.stop()
            raise ArmDown(f"arm {self.name}: {self.spec.runtime} did not open {self.spec.artifact} within {timeout:.0f} s")
        try:
            first = json.loads(parent.recv_bytes())
        except (EOFError, OSError):
            first = {"fatal": f"the {self.spec.runtime} process exited (code {self.proc.exitcode}) while opening"}
        if "fatal" in first:
            self.stop()
            raise ArmDown(f"arm {self.name}: {self.spec.runtime} cannot open {self.spec.artifact}: {first['fatal']}")
        self.info = first["ready"]
        self.down_reason = None

    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Read the worker's pipe in ``loop`` (the running one by default); the server attaches at startup so a dead
        worker is noticed without traffic. Re-attaching to another loop moves the reader."""
        loop = loop or asyncio.get_running_loop()
        if loop is self._loop or self.conn is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.conn.fileno())
        self._loop = loop
        loop.add_reader(self.conn.fileno(), self._on_readable)
        # uvloop (libuv) makes a polled fd non-blocking; the pipe's framing wants whole messages: a large one (logits
        # rows) is read to its end here while the worker writes it, and a write never fails half-done
        os.set_blocking(self.conn.fileno(), True)

    def stop(self) -> None:
        if self.conn is not None and self.down_reason is None:
            self._write(json.dumps({"op": "quit"}).encode())
        self.down_reason = self.down_reason or "stopped"
        self._detach()
        if self.proc is not None:
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)

    @property
    def up(self) -> bool:
        return self.down_reason is None

    @property
    def depth(self) -> int:
        """Requests in the worker: the running one plus those waiting."""
        return len(self._pending)

    # wire --------------------------------------------------------------------------------------------------------
    def _write(self, wire: bytes) -> None:
        try:
            self.conn.send_bytes(wire)
        except (OSError, ValueError):
            pass  # the process is gone: the reader sees EOF, reports the arm down and fails what is pending

    def _next(self) -> None:
        """Hand the oldest waiting request to the worker when it is free."""
        if self._inflight is None and self._waiting:
            self._inflight = self._waiting.popleft()
            self._write(self._pending[self._inflight].wire)

    def _detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed() and self.conn is not None:
            try:
                self._loop.remove_reader(self.conn.fileno())
            except (OSError, ValueError):
                pass
        self._loop = None

    def _on_readable(self) -> None:
        """One message from the worker (called by the event loop when the pipe is readable)."""
        try:
            msg = json.loads(self.conn.recv_bytes())
            if "logits" in msg:
                raw = self.conn.recv_bytes()
                msg["array"] = np.frombuffer(raw, dtype=np.float32).reshape(msg["logits"])
        except (EOFError, OSError, ValueError):
            self._down()
            return
        rid = msg.get("id")
        p = self._pending.get(rid)
        if p is None:
            return
        if "text" not in msg:  # final: the worker is free for the next request
            del self._pending[rid]
            if self._inflight == rid:
                self._inflight = None
            self._next()
            if p.kind == "generate" and "done" in msg:
                self._service.append(time.perf_counter() - p.t0)
        p.events.put_nowait(msg)

    def _down(self) -> None:
        self._detach()
        code = self.proc.exitcode if self.proc is not None else None
        if self.down_reason is None:
            self.down_reason = f"runtime process exited (code {code})"
            log.error("arm %s is down: %s; its traffic goes to the baseline", self.name, self.down_reason)
        pending, self._pending = self._pending, {}
        self._waiting.clear()
        self._inflight = None
        for p in pending.values():
            p.events.put_nowait({"down": self.down_reason})

    def retry_after(self) -> int:
        per = float(np.median(self._service)) if self._service else 1.0
        return max(1, int(np.ceil(per * max(1, self.depth))))

    def _submit(self, op: str, payload: dict, limit: int | None) -> tuple[int, asyncio.Queue]:
        if not self.up:
            raise ArmDown(f"arm {self.name} is down: {self.down_reason}")
        self.attach()
        if limit is not None and len(self._pending) >= 1 + limit:
            raise Overloaded(self.name, self.retry_after())
        rid = next(self._ids)
        ev: asyncio.Queue = asyncio.Queue()
        self._pending[rid] = _Pending(ev, op, json.dumps({"op": op, "id": rid, **payload}).encode())
        self._waiting.append(rid)
        self._next()
        return rid, ev

    # requests ----------------------------------------------------------------------------------------------------
    async def generate(self, ids: list[int], max_tokens: int, sampling: dict, stop: list[str], stream: bool,
                       queue_limit: int | None = None, keep_rows: bool = False):
        """Async iterator of {"text": delta} (streaming) then {"done": {...}} (with "array": the sampled rows when
        ``keep_rows`` and the runtime has them); raises ArmDown / Overloaded / RuntimeError."""
        limit = self.spec.max_queue if queue_limit is None else queue_limit
        _, ev = self._submit("generate", {"ids": ids, "max_tokens": max_tokens, "sampling": sampling, "stop": stop,
                                          "stream": stream, "keep_rows": keep_rows}, limit)
        while True:
            msg = self._check(await ev.get())
            yield msg
            if "done" in msg:
                return

    async def call(self, op: str, queue_limit: int | None = None, **payload) -> dict:
        """One-message ops: "logits" (→ msg["array"]) and "tokenize" (→ msg["ids"])."""
        _, ev = self._submit(op, payload, self.spec.max_queue if queue_limit is None else queue_limit)
        return self._check(await ev.get())

    def _check(self, msg: dict) -> dict:
        if "down" in msg:
            raise ArmDown(f"arm {self.name} went down: {msg['down']}")
        if "error" in msg:
            raise RuntimeError(msg["error"])
        return msg
