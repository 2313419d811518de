"""The server under bad input and abuse, through real uvicorn on 127.0.0.1 with a tiny model:
the photo corpus, schemathesis against the OpenAPI schema (zero 5xx), timeouts, load
shedding, stalled bodies, keys, and what an unexpected failure looks like to a client."""
from __future__ import annotations

import base64
import hmac
import json
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from captioner.service.serve import IMAGE_STATUS  # noqa: E402

from corpus import ANY_ERROR, ANYTHING, CAT, corpus  # noqa: E402
from reliability import count  # noqa: E402
from servers import Running, tiny_app  # noqa: E402

pytestmark = pytest.mark.reliability

KEY = "reliability-key-4f9a1c"
FAST = {"beam_size": "1", "max_len": "5"}


def make_app(tmp, **fields):
    return tiny_app(tmp, KEY, **fields)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("relserve")
    running = Running(make_app(tmp))
    client = httpx.Client(base_url=running.url, headers={"X-API-Key": KEY}, timeout=120)
    yield {"url": running.url, "client": client, "app": running.server.config.app, "tmp": tmp}
    client.close()
    running.stop()


def post(client, data: bytes, name: str = "photo.jpg", **fields):
    count("requests")
    return client.post("/v1/captions", files={"image": (name, data, "application/octet-stream")},
                       data={**FAST, **{k: str(v) for k, v in fields.items()}})


def test_every_corpus_photo_gets_a_caption_or_a_4xx_json_error(server):
    problems = {}
    for s in corpus():
        count("inputs")
        r = post(server["client"], s.data, s.name)
        expect = s.server or s.expect
        body = r.json()  # every answer is JSON
        if expect == "ok":
            ok = r.status_code == 200 and isinstance(body.get("caption"), str) and body.get("caption_id")
        elif expect in (ANY_ERROR, ANYTHING):
            ok = (r.status_code == 200 and expect == ANYTHING) or (
                r.status_code in (413, 415, 422) and body["detail"].startswith("image:"))
        else:
            status, code = IMAGE_STATUS[expect]
            ok = r.status_code == status and body["error"] == code and body["detail"].startswith("image:")
        if not ok:
            problems[s.name] = (r.status_code, body)
    count("failures", len(problems))
    assert not problems, problems


def test_schemathesis_finds_no_server_error(server):
    """Property-based requests generated from the server's own OpenAPI schema, valid and
    invalid (negative mode), with the key: not one answer may be a 5xx, and every error is
    the documented JSON body."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(server["url"] + "/openapi.json")
    failures = []
    sent = {"n": 0}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=schema.as_strategy(generation_mode=mode, headers={"X-API-Key": KEY}))
        def probe(case):
            response = case.call(timeout=60)
            sent["n"] += 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}")
            elif response.status_code >= 400 and case.path != "/docs":
                body = response.json()
                if set(body) != {"error", "detail"}:
                    failures.append(f"{case.method} {case.path} -> {response.status_code} without the error body: "
                                    f"{response.text[:300]}")

        probe()
    count("requests", sent["n"])
    count("failures", len(failures))
    assert sent["n"] >= 100
    assert not failures, failures[:5]


def test_hostile_bodies_get_4xx_json(server):
    client = server["client"]
    cases = [
        ("nested JSON", dict(content=b"[" * 200_000 + b"]" * 200_000, headers={"Content-Type": "application/json"})),
        ("nested feedback", dict(content=b'{"caption_id": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
                                 headers={"Content-Type": "application/json"}, url="/v1/feedback")),
        ("not UTF-8", dict(content=b'{"images": ["\xff\xfe"]}', headers={"Content-Type": "application/json"})),
        ("multipart without boundary", dict(content=b"xx", headers={"Content-Type": "multipart/form-data"})),
        ("broken multipart", dict(content=b"--b\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc",
                                  headers={"Content-Type": "multipart/form-data; boundary=b"})),
        ("two files", dict(files=[("image", ("a.jpg", CAT)), ("image", ("b.jpg", CAT))])),
        ("huge integer", dict(data={"beam_size": "9" * 5000}, files={"image": ("a.jpg", CAT)})),
        ("null byte model", dict(json={"images": [base64.b64encode(CAT).decode()], "model": "../\0etc"})),
        ("data URL junk", dict(json={"images": ["data:image/png;base64,@@@@"]})),
        ("wrong types", dict(json={"images": "not a list", "beam_size": [1]})),
        ("empty object", dict(json={})),
        ("feedback for nobody", dict(json={"caption_id": "x" * 10_000, "rating": 3}, url="/v1/feedback")),
        ("rating out of range", dict(json={"caption_id": "x", "rating": 99}, url="/v1/feedback")),
    ]
    problems = {}
    for what, kw in cases:
        url = kw.pop("url", "/v1/captions")
        r = client.post(url, **kw)
        count("requests")
        if not (400 <= r.status_code < 500 and set(r.json()) == {"error", "detail"}):
            problems[what] = (r.status_code, r.text[:200])
    count("failures", len(problems))
    assert not problems, problems


def test_keys_are_checked_in_constant_time_on_every_route(server, monkeypatch):
    """Every key is compared, with hmac.compare_digest on equal-length digests, whether or not
    an earlier one matched: the time taken says nothing about which key, or how much of it,
    was right. Every route but /healthz and the docs needs a key."""
    bare = httpx.Client(base_url=server["url"], timeout=30)
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/captions"), ("POST", "/v1/feedback")):
        for headers in ({}, {"X-API-Key": KEY + "x"}, {"Authorization": "Basic " + KEY}, {"X-API-Key": ""}):
            r = bare.request(method, path, headers=headers, json={"caption_id": "x", "rating": 1, "images": ["x"]})
            count("requests")
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", (path, headers, r.text)
    assert bare.get("/healthz").status_code == 200
    bare.close()

    from captioner.service import serve

    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(serve.hmac, "compare_digest", counting)
    assert serve.key_matches("k1", ["k1", "a-much-longer-second-key", "k3"])
    assert not serve.key_matches("nope", ["k1", "a-much-longer-second-key", "k3"])
    assert len(calls) == 6 and set(calls) == {(32, 32)}  # all keys, every time, equal lengths


def test_an_unexpected_failure_is_a_json_500_and_the_log_has_no_key(server, caplog, monkeypatch):
    svc = server["app"].state.service

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(svc.store, "add_feedback", broken)
    with caplog.at_level(logging.DEBUG):
        r = server["client"].post("/v1/feedback", json={"caption_id": "abc", "rating": 3})
    count("requests")
    count("faults")
    assert r.status_code == 500 and r.json() == {
        "error": "internal_error", "detail": "the server failed on this request; it was logged"}
    assert "disk on fire" not in r.text
    assert any("internal error on POST /v1/feedback" in rec.getMessage() for rec in caplog.records)
    assert KEY not in caplog.text


def blocked_app(tmp, **fields):
    """An app whose model workers wait for `release`: requests stay in flight on demand."""
    app = make_app(tmp, **fields)
    release = threading.Event()
    batcher = app.state.service.batcher
    real = batcher.run
    batcher.held = 0  # photos the blocked workers hold
    lock = threading.Lock()

    def run(jobs):
        with lock:
            batcher.held += len(jobs)
        release.wait(60)
        real(jobs)

    batcher.run = run
    return app, release


def test_a_request_past_its_deadline_gets_503_and_the_server_recovers(tmp_path):
    """A request not answered within request_timeout_s gets 503 (JSON, Retry-After); a photo
    still queued when its client gave up is dropped, never run; then service resumes."""
    app, release = blocked_app(tmp_path, request_timeout_s=1.0)
    running = Running(app)
    batcher = app.state.service.batcher
    workers = batcher.workers
    try:
        client = httpx.Client(base_url=running.url, headers={"X-API-Key": KEY}, timeout=60)
        answers = []
        held = []
        for n in range(1, workers + 1):  # one photo for each (stuck) model worker
            held.append(threading.Thread(target=lambda: answers.append(post(client, CAT))))
            held[-1].start()
            deadline = time.time() + 60
            while batcher.held < n and time.time() < deadline:
                time.sleep(0.02)
        answers.append(post(client, CAT))  # its photo waits in the queue behind them
        for t in held:
            t.join(60)
        count("faults", workers + 1)
        assert len(answers) == workers + 1
        for r in answers:
            assert r.status_code == 503 and r.json()["error"] == "timeout" and r.headers["retry-after"] == "1"
        release.set()  # the model is back
        r = post(client, CAT)
        assert r.status_code == 200 and r.json()["caption_id"], r.text
        # A worker counts a batch as it takes it: wait for the last one's count. Had the queued
        # photo been computed too, the count would reach workers + 2 by then.
        deadline = time.time() + 30
        while client.get("/healthz").json()["images"] < workers + 1 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        health = client.get("/healthz").json()
        # the queued photo of a gone client was skipped
        assert health["queued"] == 0 and health["images"] == workers + 1
        client.close()
    finally:
        release.set()
        running.stop()


def test_load_above_the_in_flight_limit_is_shed_with_503(tmp_path):
    app, release = blocked_app(tmp_path, max_in_flight=2, request_timeout_s=60)
    running = Running(app)
    try:
        client = httpx.Client(base_url=running.url, headers={"X-API-Key": KEY}, timeout=60)
        held = [threading.Thread(target=post, args=(client, CAT)) for _ in range(2)]
        for t in held:
            t.start()
        batcher, deadline = app.state.service.batcher, time.time() + 60
        while batcher.held + batcher.pending() < 2 and time.time() < deadline:  # both are in the server
            time.sleep(0.02)
        r = post(client, CAT)
        assert r.status_code == 503 and r.json()["error"] == "busy" and r.headers["retry-after"] == "1"
        assert client.get("/healthz").status_code == 200  # health is always answered
        count("faults")
        release.set()
        for t in held:
            t.join(60)
        assert post(client, CAT).status_code == 200
        client.close()
    finally:
        release.set()
        running.stop()


def test_a_stalled_body_gets_408_and_frees_its_slot(tmp_path):
    running = Running(make_app(tmp_path, body_timeout_s=0.5))
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode() +
                         b"\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"images\": [")
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        count("requests")
        count("faults")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), reply[:200]
        assert json.loads(body)["error"] == "body_timeout"
    finally:
        running.stop()


def test_malloc_arenas_are_limited_unless_the_operator_chose(monkeypatch):
    """The soak measured RSS creeping up with glibc's per-thread arenas and flat with two."""
    from captioner.service.serve import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False  # an explicit setting wins
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    import sys

    assert limit_malloc_arenas() is sys.platform.startswith("linux")
