"""Which arm serves a request, and whether it is shadowed.

Sticky: a request that names its user (the OpenAI ``user`` field, or the ``X-Quantprism-User`` header) is routed by
a hash of that name: u = sha256(salt | user) as a number in [0, 1); the candidate serves it when u < share. The
same user therefore stays on one arm, and raising the share only moves users from the baseline to the candidate
(never back and forth). Anonymous requests draw u at random per request. A request served by the baseline is
shadowed with probability ``shadow`` (its own draw). An arm that is down never serves: its traffic goes to the
baseline.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from .flag import FlagState

USER_HEADER = "x-quantprism-user"


def user_fraction(user: str, salt: str) -> float:
    """A stable number in [0, 1) for ``user`` (53 bits of its sha256)."""
    h = hashlib.sha256(f"{salt}|{user}".encode()).digest()
    return (int.from_bytes(h[:8], "big") >> 11) / float(1 << 53)


@dataclass(frozen=True)
class Route:
    arm: str  # the arm that answers
    shadow: bool  # also run on the candidate, off the response path
    sticky: bool
    why: str  # "share", "rollback", "candidate down", …


class Router:
    def __init__(self, salt: str = "quantprism", rng: random.Random | None = None):
        self.salt = salt
        self.rng = rng or random.Random()

    def route(self, state: FlagState, user: str | None, candidate_up: bool) -> Route:
        sticky = bool(user)
        u = user_fraction(user, self.salt) if sticky else self.rng.random()
        if u < state.share:
            if candidate_up:
                return Route(state.candidate, False, sticky, "share")
            return Route(state.baseline, False, sticky, "candidate down")
        shadow = candidate_up and state.shadow > 0 and self.rng.random() < state.shadow
        return Route(state.baseline, shadow, sticky, "baseline" if state.share > 0 else "share 0")
