"""The flag: which arm serves which share of traffic, in one small JSON file beside the build.

``BUILD_DIR/serve/flag.json`` is the whole routing state (baseline, candidate, share, shadow share). It is written
atomically (temp file, then rename), so a server that re-reads it on every request sees the old state or the new
one, never half of one; a change takes effect on the next request without a restart. Every change is appended to
``BUILD_DIR/serve/flag.log.jsonl`` with its time, who made it (user@host, pid) and what it was (the command), so a
rollback at 3 a.m. can be traced. Rollback is one line: ``quantprism rollback BUILD_DIR`` (share and shadow to 0,
every request to the baseline; the candidate stays loaded for a quick re-flag).
"""
from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import ConfigError
from ..manifest import write_json_atomic

log = logging.getLogger(__name__)

FLAG_SCHEMA = 1
ORIGINAL = "original"  # the arm name of the unquantized model (served by the torch reference runtime)


@dataclass(frozen=True)
class FlagState:
    baseline: str  # "original" or a target name
    candidate: str  # a target name
    share: float = 0.0  # fraction of users routed to the candidate
    shadow: float = 0.0  # fraction of baseline requests also run on the candidate, off the response path
    version: int = 0  # bumped on every change
    changed_at: float = 0.0
    changed_by: str = ""
    reason: str = ""

    def check(self) -> FlagState:
        for key in ("share", "shadow"):
            v = getattr(self, key)
            if not isinstance(v, int | float) or not 0.0 <= float(v) <= 1.0:
                raise ConfigError(f"flag {key}: {v!r} must be a fraction between 0 and 1 (e.g. 0.1 for 10 %)")
        if self.baseline == self.candidate:
            raise ConfigError(f"flag: baseline and candidate are both {self.baseline!r}; pick two different arms")
        return self


def flag_dir(build_dir: Path) -> Path:
    return Path(build_dir) / "serve"


def flag_path(build_dir: Path) -> Path:
    return flag_dir(build_dir) / "flag.json"


def log_path(build_dir: Path) -> Path:
    return flag_dir(build_dir) / "flag.log.jsonl"


def who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def read_flag(build_dir: Path) -> FlagState | None:
    """The current state, or None when no server was ever started on this build."""
    p = flag_path(build_dir)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: unreadable flag file ({e}); delete it and start `quantprism serve` again") from None
    if not isinstance(raw, dict) or raw.get("schema") != FLAG_SCHEMA:
        raise ConfigError(f"{p}: not a quantprism flag file (schema {raw.get('schema') if isinstance(raw, dict) else '?'})")
    fields = {k: raw[k] for k in FlagState.__dataclass_fields__ if k in raw}
    try:
        return FlagState(**fields).check()
    except TypeError as e:
        raise ConfigError(f"{p}: malformed flag file ({e})") from None


def write_flag(build_dir: Path, state: FlagState, what: str) -> FlagState:
    """Write ``state`` as the next version (atomic) and append the change to the log."""
    prev = read_flag(build_dir)
    state = replace(state.check(), version=(prev.version + 1) if prev else 1, changed_at=time.time(), changed_by=who(),
                    reason=what)
    write_json_atomic(flag_path(build_dir), {"schema": FLAG_SCHEMA, **asdict(state)})
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.changed_at)), "by": state.changed_by,
             "what": what, "command": " ".join(sys.argv[:1] + sys.argv[1:])[:500],
             "from": prev and {"share": prev.share, "shadow": prev.shadow, "baseline": prev.baseline,
                               "candidate": prev.candidate},
             "to": {"share": state.share, "shadow": state.shadow, "baseline": state.baseline, "candidate": state.candidate},
             "version": state.version}
    with open(log_path(build_dir), "a", encoding="utf-8") as f:  # one line per change, appended whole
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return state


def set_flag(build_dir: Path, share: float | None = None, shadow: float | None = None) -> FlagState:
    """`quantprism flag`: change the candidate's share and/or the shadow share of a served build."""
    prev = read_flag(build_dir)
    if prev is None:
        raise ConfigError(f"{build_dir}: no flag yet; start `quantprism serve {build_dir} --candidate TARGET` first")
    if share is None and shadow is None:
        raise ConfigError("quantprism flag: give --share and/or --shadow")
    nxt = replace(prev, share=prev.share if share is None else share, shadow=prev.shadow if shadow is None else shadow)
    return write_flag(build_dir, nxt, f"flag share {nxt.share:g} shadow {nxt.shadow:g}")


def rollback(build_dir: Path) -> FlagState:
    """`quantprism rollback`: every request to the baseline, shadow off."""
    prev = read_flag(build_dir)
    if prev is None:
        raise ConfigError(f"{build_dir}: nothing to roll back (no flag file); the build is not being served")
    return write_flag(build_dir, replace(prev, share=0.0, shadow=0.0), f"rollback to {prev.baseline}")


class FlagWatcher:
    """Re-reads the flag file when it changed (one stat per request; the read only on change)."""

    def __init__(self, build_dir: Path, initial: FlagState):
        self.build_dir = Path(build_dir)
        self.state = initial
        self._sig: tuple[int, int] | None = None
        self.errors = 0  # unreadable versions seen (the last good state is kept)

    def current(self) -> FlagState:
        p = flag_path(self.build_dir)
        try:
            st = p.stat()
        except FileNotFoundError:
            return self.state
        sig = (st.st_mtime_ns, st.st_ino)
        if sig != self._sig:
            self._sig = sig
            try:
                new = read_flag(self.build_dir)
            except ConfigError:
                self.errors += 1
                return self.state
            if new is not None and new != self.state:
                log.info("flag v%d applied: %s share %g, shadow %g (%s, by %s)", new.version, new.candidate, new.share,
                         new.shadow, new.reason, new.changed_by)
                self.state = new
        return self.state
