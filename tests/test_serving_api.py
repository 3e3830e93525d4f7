"""The HTTP service: every endpoint and every bad request in-process (httpx-based TestClient),
micro-batching, limits, readiness while loading, a bounded schemathesis run against the OpenAPI
schema, and a real `sigma serve` subprocess on a loopback port talked to with httpx."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from sigmarec.serving.api import create_app
from sigmarec.serving.batching import MicroBatcher
from sigmarec.serving.request import RecRequest
from sigmarec.serving.runtime import Runtime
from sigmarec.serving.store import U2IRow, open_store


@pytest.fixture(scope="module")
def served(tiny_run_dir, tmp_path_factory):
    """A private copy of the session's tiny run (the U2I test writes a store into it) and one
    Runtime over it, shared by every app of this module."""
    cfg, src = tiny_run_dir
    run_dir = tmp_path_factory.mktemp("serving_api") / "run"
    shutil.copytree(src, run_dir)
    return cfg, run_dir, Runtime.load(run_dir, cfg)


def _cfg(cfg, **service):
    svc = cfg.serving.service.model_copy(update=service)
    return cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"service": svc})})


@pytest.fixture(scope="module")
def client(served):
    cfg, run_dir, rt = served
    with TestClient(create_app(run_dir, cfg, runtime=rt)) as c:
        yield c


def _user(rt: Runtime, i: int = 0) -> str:
    return str(rt.data.users["user_id"].iloc[i])


def _field(resp: httpx.Response) -> str | None:
    return resp.json()["error"]["field"]


# ---------------------------------------------------------------------------- endpoints
def test_recommend_for_a_user_matches_the_runtime(client, served):
    _, _, rt = served
    u = _user(rt, 5)
    r = client.post("/v1/recommend", json={"user_id": u, "task": "JustForYou", "k": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "sigma" and body["task"] == "JustForYou" and len(body["items"]) == 6
    want = rt.recommend([RecRequest(user_id=u, task="JustForYou", k=6)])[0]
    assert [i["item_id"] for i in body["items"]] == [i.item_id for i in want]
    assert [i["rank"] for i in body["items"]] == list(range(1, 7))
    assert set(body["items"][0]) == {"rank", "item_id", "text", "prefix", "score"}


def test_recommend_with_history_instruction_filters_and_a_baseline(client, served):
    _, _, rt = served
    hist = [str(x) for x in rt.item_ids[[10, 20, 30]]]
    r = client.post("/v1/recommend", json={
        "history": hist, "profile": {"age": "45-54"}, "instruction": "find potato chips",
        "k": 4, "exclude_bought": True, "category": "GROCERY"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["task"], body["params"]) == ("Query", {"query": "potato chips"})
    assert len(body["items"]) == 4 and not {i["item_id"] for i in body["items"]} & set(hist)
    allow = [str(x) for x in rt.item_ids[[1, 2, 3]]]
    r = client.post("/v1/recommend", json={"user_id": _user(rt), "model": "sasrec_ce", "k": 3,
                                           "allow_items": allow})
    assert r.status_code == 200 and sorted(i["item_id"] for i in r.json()["items"]) == allow


def test_batch_endpoint(client, served):
    _, _, rt = served
    reqs = [{"user_id": _user(rt, i), "k": 3} for i in range(3)] + [
        {"user_id": _user(rt), "k": 2, "model": "mostpop"}]
    r = client.post("/v1/recommend/batch", json={"requests": reqs})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [len(x["items"]) for x in res] == [3, 3, 3, 2] and res[3]["model"] == "mostpop"
    single = client.post("/v1/recommend", json=reqs[1]).json()["items"]
    assert [i["item_id"] for i in res[1]["items"]] == [i["item_id"] for i in single]
    # Equal up to float noise: the batch pads prompts differently from a lone request.
    assert [i["score"] for i in res[1]["items"]] == pytest.approx([i["score"] for i in single],
                                                                  abs=1e-5)


def test_item_and_history_endpoints(client, served):
    _, _, rt = served
    item = str(rt.item_ids[0])
    r = client.get(f"/v1/items/{item}")
    assert r.status_code == 200
    body = r.json()
    assert body["item_id"] == item and body["prefix"].startswith("<a_")
    assert body["category_path"] == rt.data.items["category_path"].iloc[0]
    assert body["added_after_training"] is False
    u = _user(rt, 2)
    r = client.get(f"/v1/users/{u}/history", params={"limit": 5})
    assert r.status_code == 200
    body = r.json()
    full = rt.user_history(rt.user_idx(u))
    assert body["total"] == len(full) and len(body["items"]) == 5
    assert [i["item_id"] for i in body["items"]] == [str(rt.item_ids[i]) for i in full[-5:]]
    assert body["profile"] == rt.profile_of(rt.user_idx(u))


def test_health_readiness_metrics_and_schema(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert "sigma" in r.json()["models"] and "JustForYou" in r.json()["tasks"]
    client.post("/v1/recommend", json={"user_id": "nobody"})
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'sigma_http_requests_total{endpoint="/v1/recommend",method="POST",status="422"}' in text
    assert 'sigma_http_request_seconds_count{endpoint="/healthz",method="GET"}' in text
    assert "sigma_batch_size_count" in text and "sigma_ready 1.0" in text
    spec = client.get("/openapi.json").json()
    body = spec["components"]["schemas"]["RecommendBody"]["properties"]
    assert body["instruction"]["anyOf"][0]["maxLength"] == 500
    assert body["history"]["anyOf"][0]["maxItems"] == 1000
    assert body["k"]["minimum"] == 1
    assert {"/v1/recommend", "/v1/recommend/batch", "/v1/items/{item_id}",
            "/v1/users/{user_id}/history", "/healthz", "/readyz", "/metrics",
            "/v1/u2i/{user_id}"} <= set(spec["paths"])


def test_u2i_endpoint_reads_the_store(client, served):
    cfg, run_dir, rt = served
    u = _user(rt, 1)
    with open_store(cfg.serving.u2i_store, run_dir) as store:
        store.publish([U2IRow(user_id=u, task="JustForYou", items=["a", "b"],
                              scores=[0.5, 0.25])], source="test")
    r = client.get(f"/v1/u2i/{u}", params={"task": "JustForYou"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [i["item_id"] for i in body["items"]] == ["a", "b"] and body["version"] >= 1
    assert client.get(f"/v1/u2i/{u}", params={"task": "Season"}).status_code == 404
    assert _field(client.get("/v1/u2i/nobody")) == "user_id"


# ---------------------------------------------------------------------------- bad requests
def _bad(rt: Runtime) -> list[tuple[dict, int, str]]:
    u, item = _user(rt), str(rt.item_ids[0])
    return [
        ({"user_id": "no-such-user"}, 422, "user_id"),
        ({"history": ["no-such-item"]}, 422, "history[0]"),
        ({"history": [item, str(rt.item_ids[1]), item]}, 422, "history[2]"),
        ({"history": []}, 422, "history"),
        ({"user_id": u, "task": "Trending"}, 422, "task"),
        ({"user_id": u, "instruction": "y" * 501}, 422, "instruction"),
        ({"user_id": u, "k": 0}, 422, "k"),
        ({"user_id": u, "k": -1}, 422, "k"),
        ({"user_id": u, "k": rt.n_items + 1}, 422, "k"),
        ({"user_id": u, "k": "ten"}, 422, "k"),
        ({"user_id": u, "model": "gpt"}, 422, "model"),
        ({"user_id": u, "colour": "red"}, 422, "colour"),
        ({"user_id": u, "category": "NOWHERE"}, 422, "category"),
        ({"user_id": u, "allow_items": ["nope"]}, 422, "allow_items[0]"),
        ({"history": [item], "profile": {"pet": "cat"}}, 422, "profile.pet"),
    ]


def test_unknown_paths_and_methods_name_what_is_at_fault(client):
    r = client.get("/v1/recommendations")
    assert (r.status_code, _field(r)) == (404, "path")
    assert "/v1/recommendations" in r.json()["error"]["message"]
    r = client.get("/v1/recommend")
    assert (r.status_code, _field(r)) == (405, "method")
    assert "POST" in r.json()["error"]["message"] and "POST" in r.headers["allow"]
    doc = (Path(__file__).parents[1] / "docs" / "serving.md").read_text()
    assert "| 404 | `path` |" in doc and "| 405 | `method`" in doc


def test_every_bad_request_is_a_4xx_naming_the_field(client, served):
    _, _, rt = served
    for body, status, field in _bad(rt):
        r = client.post("/v1/recommend", json=body)
        assert (r.status_code, _field(r)) == (status, field), (body, r.text)
        assert r.json()["error"]["message"]
    r = client.post("/v1/recommend/batch", json={"requests": [{"user_id": _user(rt)},
                                                              {"user_id": "ghost"}]})
    assert (r.status_code, _field(r)) == (422, "requests[1].user_id")
    r = client.post("/v1/recommend/batch", json={"requests": []})
    assert (r.status_code, _field(r)) == (422, "requests")
    assert _field(client.get("/v1/items/no-such-item")) == "item_id"
    assert client.get("/v1/items/no-such-item").status_code == 404
    assert client.get("/v1/users/ghost/history").status_code == 404
    assert _field(client.get(f"/v1/users/{_user(rt)}/history", params={"limit": 0})) == "limit"


def test_malformed_json_and_oversized_bodies(client, served):
    _, _, rt = served
    headers = {"content-type": "application/json"}
    r = client.post("/v1/recommend", content=b'{"user_id": ', headers=headers)
    assert (r.status_code, _field(r)) == (400, "body")
    r = client.post("/v1/recommend", content=b"[1, 2]", headers=headers)
    assert r.status_code == 422
    big = b'{"user_id": "' + b"x" * 1_100_000 + b'"}'
    r = client.post("/v1/recommend", content=big, headers=headers)
    assert (r.status_code, _field(r)) == (413, "body")
    # No Content-Length (chunked): the limit holds on the bytes actually streamed.
    r = client.post("/v1/recommend", content=iter([big[:600_000], big[600_000:]]),
                    headers=headers)
    assert (r.status_code, _field(r)) == (413, "body")
    # ...and the service carries on.
    assert client.post("/v1/recommend", json={"user_id": _user(rt), "k": 1}).status_code == 200


def test_an_internal_error_is_a_500_and_the_service_keeps_serving(served):
    cfg, run_dir, rt = served
    app = create_app(run_dir, cfg, runtime=rt)
    service = app.state.service
    real = service.batcher.fn
    fail = {"on": True}

    def flaky(batch):
        if fail["on"]:
            raise RuntimeError("boom")
        return real(batch)

    service.batcher.fn = flaky
    # As under uvicorn: the error is answered (and re-raised to the server's log), not raised
    # into the client.
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/recommend", json={"user_id": _user(rt)})
        assert r.status_code == 500 and "RuntimeError" in r.json()["error"]["message"]
        fail["on"] = False
        assert c.post("/v1/recommend", json={"user_id": _user(rt)}).status_code == 200


# ---------------------------------------------------------------------------- batching, limits
def test_concurrent_requests_are_fused_into_one_call(served):
    cfg, run_dir, rt = served
    app = create_app(run_dir, _cfg(cfg, max_batch_size=8, max_wait_ms=300), runtime=rt)
    service = app.state.service
    sizes = []
    real = service.batcher.fn
    service.batcher.fn = lambda batch: sizes.append(len(batch)) or real(batch)
    users = [_user(rt, i) for i in range(6)]
    with TestClient(app) as c:
        out = {}

        def call(u):
            out[u] = c.post("/v1/recommend", json={"user_id": u, "k": 4})

        threads = [threading.Thread(target=call, args=(u,)) for u in users]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        metrics = c.get("/metrics").text
    assert sum(sizes) == 6 and max(sizes) > 1, sizes
    want = rt.recommend([RecRequest(user_id=u, k=4) for u in users])
    for u, w in zip(users, want, strict=True):
        assert out[u].status_code == 200
        assert [i["item_id"] for i in out[u].json()["items"]] == [i.item_id for i in w]
    assert f"sigma_batch_size_count {float(len(sizes))}" in metrics


def test_concurrency_limit_is_a_503(served):
    cfg, run_dir, rt = served
    app = create_app(run_dir, _cfg(cfg, max_concurrency=1, max_batch_size=1), runtime=rt)
    service = app.state.service
    entered, release = threading.Event(), threading.Event()
    real = service.batcher.fn

    def held(batch):
        entered.set()
        release.wait(30)
        return real(batch)

    service.batcher.fn = held
    with TestClient(app) as c:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault(
            "r", c.post("/v1/recommend", json={"user_id": _user(rt)})))
        t.start()
        assert entered.wait(30)  # the first request is in flight, held inside the model call
        r = c.post("/v1/recommend", json={"user_id": _user(rt)})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "max_concurrency" in r.json()["error"]["message"]
        assert c.get("/healthz").status_code == 200  # operations endpoints are never refused
        release.set()
        t.join(30)
        assert first["r"].status_code == 200
        assert 'sigma_http_rejected_total{reason="concurrency"}' in c.get("/metrics").text


def test_micro_batcher_bounds():
    async def scenario():
        calls = []

        def fn(xs):
            calls.append(list(xs))
            if -1 in xs:
                raise ValueError("bad input in batch")
            return [x * 10 for x in xs]

        b = MicroBatcher(fn, max_batch_size=4, max_wait_ms=50)
        await b.start()
        try:
            assert await asyncio.gather(*(b.submit(i) for i in range(10))) == [
                i * 10 for i in range(10)]
            assert max(len(c) for c in calls) == 4 and sum(len(c) for c in calls) == 10
            t0 = time.perf_counter()
            assert await b.submit(7) == 70  # a lone request waits at most max_wait_ms
            assert time.perf_counter() - t0 < 2.0
            got = await asyncio.gather(b.submit(1), b.submit(-1), return_exceptions=True)
            assert all(isinstance(g, ValueError) for g in got)  # the whole batch learns of it
            assert await b.submit_many([3, 4]) == [30, 40]
        finally:
            await b.stop()

    asyncio.run(scenario())
    with pytest.raises(ValueError):
        MicroBatcher(lambda xs: xs, max_batch_size=0, max_wait_ms=1)


def test_readiness_while_loading_and_after_a_failed_load(served, monkeypatch):
    cfg, run_dir, rt = served
    gate = threading.Event()

    def slow_load(run, c):
        gate.wait(30)
        return rt

    monkeypatch.setattr(Runtime, "load", staticmethod(slow_load))
    with TestClient(create_app(run_dir, cfg)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.post("/v1/recommend", json={"user_id": _user(rt)})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        gate.set()
        for _ in range(200):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/recommend", json={"user_id": _user(rt)}).status_code == 200

    def broken(run, c):
        raise FileNotFoundError("training/model/weights.safetensors")

    monkeypatch.setattr(Runtime, "load", staticmethod(broken))
    reasons: list[str] = []
    with TestClient(create_app(run_dir, cfg, on_load_failure=reasons.append)) as c:
        for _ in range(200):
            r = c.get("/readyz")
            if r.json()["status"] != "loading":
                break
            time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert "weights.safetensors" in r.json()["detail"]
        assert reasons == [r.json()["detail"]]


def test_sigma_serve_that_cannot_load_the_run_says_why_and_exits(tmp_path):
    # Started from another directory than `sigma run`: no run there. The reason is logged and
    # the process ends non-zero, so a `until curl .../readyz` loop can stop waiting.
    proc = subprocess.run(
        [sys.executable, "-m", "sigmarec.cli", "serve", "-p", "tiny", "-o",
         str(tmp_path / "no-run"), "--host", "127.0.0.1", "--port", str(_free_port())],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "cannot load" in out and "not a trained run directory" in out
    assert "run `sigma run` with the same --profile/--out" in out


# ---------------------------------------------------------------------------- schemathesis
def test_openapi_schema_holds(served):
    """Every operation of the published schema, with valid and with invalid inputs: no 5xx,
    and every status, content type and body is one the schema documents. (Driven through
    hypothesis directly: schemathesis' pytest plugin does not run under pytest 9.)"""
    cfg, run_dir, rt = served
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(run_dir, cfg, runtime=rt))
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) == 8
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(mode))
            @settings(max_examples=8, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                case.call_and_validate(checks=checks)

            try:
                check()
            except Unsatisfiable:
                # Nothing of this operation can be made invalid (no parameters, no body).
                assert mode is GenerationMode.NEGATIVE, op.label


# ---------------------------------------------------------------------------- real client
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigma_serve_subprocess_with_httpx(served, tmp_path):
    _, run_dir, rt = served
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - read back after the process ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "sigmarec.cli", "serve", "-p", "tiny", "-o", str(run_dir),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        ready = False
        with httpx.Client(base_url=base, timeout=30) as http:
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(httpx.TransportError):
                    ready = http.get("/readyz").status_code == 200
                if ready:
                    break
                time.sleep(0.3)
            assert ready, (log.seek(0), log.read())
            r = http.post("/v1/recommend", json={"user_id": _user(rt), "k": 3})
            assert r.status_code == 200 and len(r.json()["items"]) == 3
            r = http.post("/v1/recommend", json={"user_id": _user(rt), "k": 0})
            assert (r.status_code, _field(r)) == (422, "k")
            assert "sigma_http_requests_total" in http.get("/metrics").text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
