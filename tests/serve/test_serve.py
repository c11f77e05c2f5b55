"""`quantprism serve` with its real runtimes (torch original, llama.cpp, ONNX Runtime) over loopback HTTP, through
httpx and the official openai client: answers equal each runtime called directly, the flag and rollback act on
the next request, shadow compares are recorded without touching responses, overload/timeout/bad input get their
status codes, and a dead arm's traffic goes to the baseline."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time

import httpx
import numpy as np
import pytest

from conftest import require
from serving import Running, make_served_build

require("llama_cpp", "make install builds llama-cpp-python")
require("openai", "make install installs the serve extra")
pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

PROMPT = "The old king looked at the"


@pytest.fixture(scope="module")
def served_build(tmp_path_factory):
    return make_served_build(tmp_path_factory)


@pytest.fixture(scope="module")
def srv(served_build):
    r = Running(served_build, baseline="original", candidate="q4km", share=0.0, shadow=0.0, max_queue=4)
    yield r
    r.close()


def _direct(runtime: str, artifact, ids: list[int], n: int) -> str:
    from quantprism.runtimes import open_runtime

    s = open_runtime(runtime, artifact, threads=1)
    try:
        return s.detokenize(s.generate(ids, n))
    finally:
        s.close()


def _post(url: str, body, path: str = "/v1/completions", **kw) -> httpx.Response:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx.post(url + path, content=data, headers={"content-type": "application/json", **kw.pop("headers", {})},
                      timeout=120, **kw)


def test_each_arm_answers_as_its_runtime_does_directly(srv):
    import openai

    server = srv.server
    ids = server.encode(PROMPT)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
    for arm in ("original", "q4km"):
        r = client.completions.create(model=arm, prompt=PROMPT, max_tokens=12, temperature=0)
        spec = server.arms[arm].spec
        assert r.model == arm and r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
        assert r.choices[0].text == _direct(spec.runtime, spec.artifact, ids, 12), arm
    routed = client.completions.create(model="quantprism", prompt=PROMPT, max_tokens=4, temperature=0)
    assert routed.model == "original"  # share 0: the flag sends everyone to the baseline
    models = {m.id for m in client.models.list().data}
    assert models == {"quantprism", "original", "q4km"}


def test_streaming_equals_the_whole_answer_for_completions_and_chat(srv):
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
    whole = client.completions.create(model="q4km", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    parts = list(client.completions.create(model="q4km", prompt=PROMPT, max_tokens=20, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole
    assert parts[-1].choices[0].finish_reason == "length"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who was the king?"}]
    chat = client.chat.completions.create(model="q4km", messages=msgs, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="q4km", messages=msgs, max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content and chat.model == "q4km"
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens == 16


def test_chat_renders_the_models_own_template(srv):
    """The chat answer equals a completion of the template-rendered prompt (same ids, same runtime)."""
    tok = srv.server.tok
    msgs = [{"role": "user", "content": "Tell me of the sea."}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert tok.decode(ids).endswith("<assistant>")
    chat = _post(srv.url, {"model": "original", "messages": msgs, "max_tokens": 10, "temperature": 0},
                 "/v1/chat/completions").json()
    comp = _post(srv.url, {"model": "original", "prompt": ids, "max_tokens": 10, "temperature": 0}).json()
    assert chat["choices"][0]["message"]["content"] == comp["choices"][0]["text"]
    assert chat["usage"]["prompt_tokens"] == len(ids)


def test_sampling_is_seeded(srv):
    body = {"model": "q4km", "prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    a, b = (_post(srv.url, body).json()["choices"][0]["text"] for _ in range(2))
    c = _post(srv.url, {**body, "seed": 8}).json()["choices"][0]["text"]
    greedy = _post(srv.url, {**body, "temperature": 0}).json()["choices"][0]["text"]
    assert a == b and len({a, c, greedy}) >= 2


def test_flag_and_rollback_act_on_the_next_request(srv, served_build, run_cli):
    from quantprism.serve.flag import log_path

    def arm(user=None, header=None):
        body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, **({"user": user} if user else {})}
        return _post(srv.url, body, headers={"x-quantprism-user": header} if header else {}).json()["model"]

    assert {arm() for _ in range(5)} == {"original"}
    rc, out, err = run_cli("flag", served_build, "--share", "1")
    assert rc == 0 and "share 1" in out, err
    assert {arm(), arm("bob")} == {"q4km"}
    run_cli("flag", served_build, "--share", "0.5")
    for who in ("alice", "bob", "carol", "dave"):  # sticky: one user, one arm
        assert len({arm(who) for _ in range(4)}) == 1
        assert arm(who) == arm(header=who)
    rc, out, err = run_cli("rollback", served_build)
    assert rc == 0 and "rolled back" in out
    assert {arm(w) for w in ("alice", "bob", "carol", "dave", "erin")} == {"original"}
    whats = [json.loads(x)["what"] for x in log_path(served_build).read_text().splitlines()]
    assert whats[-3:] == ["flag share 1 shadow 0", "flag share 0.5 shadow 0", "rollback to original"]
    health = httpx.get(srv.url + "/healthz").json()
    assert health["flag"]["share"] == 0.0 and health["flag"]["reason"] == "rollback to original"


def test_shadow_is_recorded_and_leaves_the_response_alone(srv, served_build, run_cli):
    from quantprism.serve.shadow import read_shadow

    body = {"prompt": "In the morning the", "max_tokens": 12, "temperature": 0}
    before = _post(srv.url, body).json()
    log = served_build / "serve" / "shadow.jsonl"
    n0 = len(read_shadow(log))
    run_cli("flag", served_build, "--share", "0", "--shadow", "1")
    after = _post(srv.url, body).json()
    assert after["model"] == before["model"] == "original"
    assert after["choices"] == before["choices"]
    deadline = time.time() + 60
    while len(read_shadow(log)) == n0 and time.time() < deadline:
        time.sleep(0.1)
    rec = read_shadow(log)[-1]
    assert rec["candidate"] == "q4km" and rec["baseline"] == "original" and not rec["sampled"]
    assert isinstance(rec["exact_match"], bool) and rec["baseline_tokens"] == 12
    # the build's own offline KLD of this Q4_K_M is ~1e-3; the shadow's is the same quantity on this prompt
    assert 0 < rec["kld_mean"] < 0.05
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'quantprism_shadow_total{result="compared"}' in metrics
    run_cli("flag", served_build, "--shadow", "0")
    rc, out, err = run_cli("report", served_build / "results.json")  # live compares beside the offline results
    assert rc == 0, err
    report = (served_build / "report.md").read_text()
    assert "Live shadow compare" in report
    row = next(ln for ln in report.splitlines() if ln.startswith("| q4km | original |"))
    offline = next(t for t in json.loads((served_build / "results.json").read_text())["targets"] if t["name"] == "q4km")
    assert f"| {rec['kld_mean']:.6f} |" in row and f"| {offline['quality']['kld_mean']:.6f} |" in row  # one compare


def test_shadow_compare_catches_a_diverging_candidate():
    from quantprism.serve.shadow import compare, first_divergence

    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 50)).astype(np.float32)
    forced = np.concatenate([rng.normal(size=(3, 50)), base]).astype(np.float32)  # prompt of 4: rows 3.. align
    same = compare(4, [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], base, forced)
    assert same["exact_match"] and same["first_divergence"] is None and same["kld_mean"] < 1e-9
    off = forced.copy()
    off[5] += rng.normal(scale=3, size=50).astype(np.float32)
    diff = compare(4, [1, 2, 3, 4, 5, 6], [1, 2, 9], base, off)
    assert not diff["exact_match"] and diff["first_divergence"] == 2 and diff["kld_max"] > 0.1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


@pytest.mark.parametrize("body,param", [
    (b"{not json", None), ({"prompt": 5}, "prompt"), ({"prompt": "x", "n": 2}, "n"), ({"prompt": "x", "temperature": 5}, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"), ({"prompt": "x", "max_tokens": 4096}, "max_tokens"),
    ({"prompt": "x", "model": "gpt-9"}, "model"), ({"prompt": "x", "stop": [1]}, "stop"), ({"prompt": [10 ** 9]}, "prompt"),
    ({"prompt": "x", "logprobs": 3}, "logprobs"), (b"[1, 2]", None), (b"\xff\xfe", None),
])
def test_bad_input_is_400_with_an_openai_error_body(srv, body, param):
    r = _post(srv.url, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param


def test_bad_chat_input_and_the_server_stays_up(srv):
    for body in ({"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]}, {"messages": "hi"}):
        r = _post(srv.url, body, "/v1/chat/completions")
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    assert httpx.get(srv.url + "/healthz").json()["status"] == "ok"


def test_overload_is_429_with_retry_after_and_nothing_else_fails(srv):
    arm = srv.server.arms["original"]
    arm.spec.max_queue = 0
    try:
        with cf.ThreadPoolExecutor(8) as ex:
            rs = list(ex.map(lambda _: _post(srv.url, {"model": "original", "prompt": PROMPT, "max_tokens": 48,
                                                       "temperature": 0}), range(8)))
    finally:
        arm.spec.max_queue = 4
    codes = [r.status_code for r in rs]
    assert set(codes) == {200, 429}, codes
    r429 = next(r for r in rs if r.status_code == 429)
    assert int(r429.headers["retry-after"]) >= 1 and r429.json()["error"]["type"] == "rate_limit_exceeded"


def test_timeout_is_504(srv):
    srv.server.timeout_s = 0.01
    try:
        r = _post(srv.url, {"model": "original", "prompt": PROMPT, "max_tokens": 200, "temperature": 0})
    finally:
        srv.server.timeout_s = 60.0
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    time.sleep(1.5)  # the abandoned generation finishes in its process; the arm serves on
    assert _post(srv.url, {"model": "original", "prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_metrics_per_arm(srv):
    text = httpx.get(srv.url + "/metrics").text
    for needle in ('quantprism_requests_total{arm="original",endpoint="completions",status="200"}',
                   'quantprism_tokens_total{arm="q4km",kind="completion"}', 'quantprism_request_seconds_bucket{arm="q4km"',
                   'quantprism_queue_depth{arm="original"}', 'quantprism_arm_up{arm="q4km"} 1.0',
                   'quantprism_errors_total{arm="-",kind="bad_request"}', "quantprism_flag_version"):
        assert needle in text, needle


def test_stop_sequences_cut_the_text_streaming_or_not(srv):
    body = {"model": "q4km", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    full = _post(srv.url, body).json()["choices"][0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    cut = full[: full.index(stop)]
    r = _post(srv.url, {**body, "stop": [stop, "@@never@@"]}).json()["choices"][0]
    assert (r["text"], r["finish_reason"]) == (cut, "stop")
    with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stop": stop, "stream": True}, timeout=60) as s:
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events) == cut and events[-1]["choices"][0]["finish_reason"] == "stop"


def test_kserve_manifests_parse_into_the_kserve_sdk_models(srv, served_build, run_cli, tmp_path):
    """Baseline, canary at the share, rollback at 0, runtimes per format, artifacts by sha256 — through the SDK."""
    import hashlib
    import subprocess
    from pathlib import Path

    fleet = Path(__file__).resolve().parents[2] / ".fleet-venv" / "bin" / "python"
    assert fleet.is_file(), "make install builds .fleet-venv (the KServe SDK)"
    check = Path(__file__).with_name("kserve_check.py")
    rc, out, err = run_cli("deploy", served_build, "--kserve", "--candidate", "q4km", "--share", "0.2",
                           "--storage-uri", "s3://models/qp", "--out", tmp_path / "d")
    assert rc == 0, err
    files = sorted((tmp_path / "d" / "kserve").glob("*.yaml"))
    res = subprocess.run([str(fleet), str(check), *map(str, files)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    objs = {(o["kind"], Path(o["file"]).name): o for o in map(json.loads, res.stdout.splitlines())}
    gguf = served_build / "q4km" / "model.gguf"
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    base, canary, back = (objs[("InferenceService", f)] for f in ("10-baseline.yaml", "20-canary.yaml", "90-rollback.yaml"))
    assert base["arm"] == "original" and base["format"] == "huggingface" and base["canary"] is None
    assert canary["arm"] == "q4km" and canary["format"] == "gguf" and canary["canary"] == 20
    assert canary["storage_uri"] == f"s3://models/qp/{sha}" and back["canary"] == 0
    assert base["name"] == canary["name"] == back["name"]  # one InferenceService, three revisions of it
    assert objs[("ServingRuntime", "00-runtimes.yaml")]["formats"] == ["gguf"]
    arts = json.loads((tmp_path / "d" / "artifacts.json").read_text())["artifacts"]
    assert arts[sha]["arm"] == "q4km"
    # the check can fail: a misspelled field is refused by the SDK models
    bad = tmp_path / "bad.yaml"
    bad.write_text(files[2].read_text().replace("canaryTrafficPercent", "canaryTrafficPercnt"))
    res = subprocess.run([str(fleet), str(check), str(bad)], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "canaryTrafficPercnt" in res.stderr
    rc, out, err = run_cli("deploy", served_build, "--kserve", "--candidate", "int8", "--out", tmp_path / "e")
    assert rc == 2 and "no stock KServe runtime" in err


def test_litellm_config_routes_real_requests_to_the_served_arms(srv, served_build, run_cli, tmp_path):
    """LiteLLM's own Router, loaded from our config, sends weighted traffic to the two arms and mirrors the shadow."""
    import asyncio

    import yaml
    from litellm import Router

    rc, out, err = run_cli("deploy", served_build, "--litellm", "--candidate", "q4km", "--share", "0.5", "--shadow", "1",
                           "--endpoint", srv.url + "/v1", "--name", "story", "--out", tmp_path / "d")
    assert rc == 0, err
    cfg = yaml.safe_load((tmp_path / "d" / "litellm" / "config.yaml").read_text())
    router = Router(model_list=cfg["model_list"], **cfg["router_settings"])
    before = httpx.get(srv.url + "/metrics").text

    def served(text: str, arm: str) -> float:
        line = f'quantprism_requests_total{{arm="{arm}",endpoint="chat",status="200"}} '
        return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)), 0.0)

    async def go():
        rs = [await router.acompletion(model="story", messages=[{"role": "user", "content": f"Tell tale {i}."}],
                                       max_tokens=4, temperature=0) for i in range(24)]
        await asyncio.sleep(3)  # the mirrored calls run in the background
        return rs

    rs = asyncio.run(go())
    assert all(r.choices[0].message.content is not None for r in rs)
    after = httpx.get(srv.url + "/metrics").text
    n_base = served(after, "original") - served(before, "original")
    n_cand = served(after, "q4km") - served(before, "q4km")
    assert n_base >= 4 and n_cand >= 4  # both arms served real traffic at share 0.5
    assert n_base + n_cand > 24  # and the baseline's requests were mirrored to the candidate (silent_model)


def test_a_dead_candidate_is_taken_out_and_its_traffic_goes_to_the_baseline(srv, served_build, run_cli):
    """Last in the module: SIGKILL the candidate's runtime process."""
    pid = httpx.get(srv.url + "/healthz").json()["arms"]["q4km"]["pid"]
    run_cli("flag", served_build, "--share", "1")
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 20
    while httpx.get(srv.url + "/healthz").json()["status"] != "degraded" and time.time() < deadline:
        time.sleep(0.05)
    h = httpx.get(srv.url + "/healthz")
    assert h.status_code == 200 and h.json()["arms"]["q4km"]["up"] is False
    assert "exited" in h.json()["arms"]["q4km"]["reason"]
    r = _post(srv.url, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "user": "anyone"})
    assert r.status_code == 200 and r.json()["model"] == "original"
    pinned = _post(srv.url, {"model": "q4km", "prompt": PROMPT, "max_tokens": 4})
    assert pinned.status_code == 503
    assert 'quantprism_arm_up{arm="q4km"} 0.0' in httpx.get(srv.url + "/metrics").text


def test_an_onnx_runtime_candidate_behind_a_gguf_baseline(served_build):
    r = Running(served_build, baseline="q4km", candidate="int8", share=1.0)
    try:
        server = r.server
        ids = server.encode(PROMPT)
        got = _post(r.url, {"prompt": PROMPT, "max_tokens": 10, "temperature": 0}).json()
        spec = server.arms["int8"].spec
        assert got["model"] == "int8" and spec.runtime == "onnxruntime"
        assert got["choices"][0]["text"] == _direct("onnxruntime", spec.artifact, ids, 10)
    finally:
        r.close()



def test_a_vllm_baseline_serves_streams_and_is_shadowed(served_build):
    """vLLM as an arm (in its own process, its engine in that process's main thread); its scheduler exposes no
    sampled rows, so the shadow compare records tokens and says why KLD is missing."""
    from quantprism.serve.shadow import read_shadow

    r = Running(served_build, baseline="w4", candidate="q4km", share=0.0, shadow=1.0)
    try:
        h = httpx.get(r.url + "/healthz").json()
        assert h["arms"]["w4"]["runtime"] == "vllm" and h["arms"]["w4"]["up"]
        body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        whole = _post(r.url, body).json()
        assert whole["model"] == "w4" and whole["usage"]["completion_tokens"] > 0
        with httpx.stream("POST", r.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as s:
            events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
        assert "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]
        log = served_build / "serve" / "shadow.jsonl"
        deadline = time.time() + 60
        while not any(x.get("baseline") == "w4" and "exact_match" in x for x in read_shadow(log)) and time.time() < deadline:
            time.sleep(0.1)
        rec = [x for x in read_shadow(log) if x.get("baseline") == "w4" and "exact_match" in x][-1]
        assert rec["kld_mean"] is None and "vLLM" in rec["kld_note"] and isinstance(rec["exact_match"], bool)
    finally:
        r.close()
