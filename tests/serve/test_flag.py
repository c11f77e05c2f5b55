"""The flag file and the router, without a server: atomic versions, the change log, rollback, sticky routing."""
from __future__ import annotations

import json
import random

import pytest

from quantprism.errors import ConfigError
from quantprism.serve.flag import (
    FlagState,
    FlagWatcher,
    flag_path,
    log_path,
    read_flag,
    rollback,
    set_flag,
    write_flag,
)
from quantprism.serve.router import Router, user_fraction


def test_flag_versions_log_and_rollback(tmp_path):
    assert read_flag(tmp_path) is None
    with pytest.raises(ConfigError, match="start `quantprism serve"):
        set_flag(tmp_path, share=0.5)
    with pytest.raises(ConfigError, match="nothing to roll back"):
        rollback(tmp_path)
    s1 = write_flag(tmp_path, FlagState("original", "q4", share=0.1, shadow=0.05), "serve start")
    s2 = set_flag(tmp_path, share=0.25)
    s3 = rollback(tmp_path)
    assert (s1.version, s2.version, s3.version) == (1, 2, 3)
    assert (s2.share, s2.shadow) == (0.25, 0.05) and (s3.share, s3.shadow) == (0.0, 0.0)
    assert read_flag(tmp_path) == s3
    log = [json.loads(x) for x in log_path(tmp_path).read_text().splitlines()]
    assert [e["what"] for e in log] == ["serve start", "flag share 0.25 shadow 0.05", "rollback to original"]
    assert all(e["by"] and e["time"].endswith("Z") for e in log)
    assert log[2]["from"]["share"] == 0.25 and log[2]["to"]["share"] == 0.0
    assert not list(flag_path(tmp_path).parent.glob("*.tmp"))  # written by rename, no leftovers


@pytest.mark.parametrize("bad", [{"share": 1.5}, {"shadow": -0.1}, {"share": "x"}])
def test_bad_fractions_are_refused(tmp_path, bad):
    with pytest.raises(ConfigError, match="fraction between 0 and 1"):
        write_flag(tmp_path, FlagState("original", "q4", **bad), "x")


def test_corrupt_flag_file_is_an_error_and_the_watcher_keeps_the_last_good_state(tmp_path):
    good = write_flag(tmp_path, FlagState("original", "q4", share=0.3), "start")
    w = FlagWatcher(tmp_path, good)
    assert w.current().share == 0.3
    set_flag(tmp_path, share=0.6)
    assert w.current().share == 0.6  # the next request sees the change
    flag_path(tmp_path).write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable flag file"):
        read_flag(tmp_path)
    assert w.current().share == 0.6 and w.errors == 1


def test_sticky_routing_is_stable_monotone_and_close_to_the_share():
    r = Router(salt="s", rng=random.Random(0))
    users = [f"user{i}" for i in range(4000)]
    at = {}
    for share in (0.1, 0.25, 0.5):
        st = FlagState("original", "q4", share=share)
        at[share] = {u for u in users if r.route(st, u, True).arm == "q4"}
        # binomial: 4000 users, sd = sqrt(p(1-p)/n) ≤ 0.008; 5 sd
        assert abs(len(at[share]) / len(users) - share) < 0.04
        assert all(r.route(st, u, True).arm == ("q4" if u in at[share] else "original") for u in users[:200])
    assert at[0.1] <= at[0.25] <= at[0.5]  # raising the share only moves users to the candidate
    st = FlagState("original", "q4", share=1.0)
    assert {r.route(st, u, False).arm for u in users[:50]} == {"original"}  # candidate down → baseline
    assert 0.0 <= user_fraction("x", "s") < 1.0


def test_shadow_draws_only_on_baseline_requests():
    r = Router(rng=random.Random(1))
    st = FlagState("original", "q4", share=0.5, shadow=1.0)
    routes = [r.route(st, None, True) for _ in range(400)]
    assert all(x.shadow for x in routes if x.arm == "original")
    assert not any(x.shadow for x in routes if x.arm == "q4")
    assert 120 < sum(x.arm == "q4" for x in routes) < 280
