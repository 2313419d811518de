"""The REST API through a real uvicorn server on 127.0.0.1: upload, batch, errors, auth, A/B
stickiness, feedback round trip and what lands in the store (SQLite, and PostgreSQL where it runs)."""
from __future__ import annotations

import base64
import io
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from captioner.service.ab import assign  # noqa: E402
from captioner.inference.api import default_model_path  # noqa: E402
from captioner.inference.api import Captioner  # noqa: E402
from captioner.models.checkpoint import read_checkpoint, write_checkpoint  # noqa: E402
from captioner.service.config import load_serve_config  # noqa: E402
from captioner.service.feedback import FeedbackStore, client_hash  # noqa: E402
from captioner.service.serve import create_app  # noqa: E402

from conftest import REPO, make_photo  # noqa: E402
from servers import Running, free_port  # noqa: E402

KEY = "test-key-0123456789"
CAT = (REPO / "examples" / "cat.jpg").read_bytes()
FAST = {"beam_size": "1", "max_len": "6"}  # short searches keep the tests quick


def small_photo(tmp: Path, seed: int) -> bytes:
    path = tmp / f"p{seed}.jpg"
    make_photo(path, ["red", "blue", "green"][seed % 3], ["square", "circle"][seed % 2], seed=seed)
    return path.read_bytes()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size in the header but holds almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def start_served(tmp: Path, db: str):
    (tmp / "models").mkdir()
    candidate = read_checkpoint(default_model_path())  # the default, with a search of its own
    candidate["decode"].update(length_penalty=0.5, no_repeat_ngram=0)
    write_checkpoint(candidate, tmp / "models" / "candidate.pt")
    cfg_file = tmp / "serve.toml"
    cfg_file.write_text(f"""
model_dir = "models"
db = "{db}"
api_keys = ["{KEY}"]
max_batch = 8
max_wait_ms = 60
max_body_bytes = 2_000_000
max_pixels = 4_000_000
max_images = 4
max_beam_size = 5
max_len = 30

[experiment]
name = "exp1"

[[experiment.variants]]
name = "control"
checkpoint = "default"
weight = 1

[[experiment.variants]]
name = "candidate"
checkpoint = "candidate.pt"
weight = 1
""")
    cfg = load_serve_config(cfg_file)
    running = Running(create_app(cfg))
    client = httpx.Client(base_url=running.url, headers={"X-API-Key": KEY}, timeout=60)
    return {"url": running.url, "client": client, "cfg": cfg, "tmp": tmp, "running": running}


def stop_served(s: dict) -> None:
    s["client"].close()
    s["running"].stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = start_served(tmp_path_factory.mktemp("serve"), "feedback.db")
    yield s
    stop_served(s)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def served_db(request, tmp_path_factory):
    """The same server on each store backend: the SQLite one above, then one on PostgreSQL."""
    if request.param == "sqlite":
        yield request.getfixturevalue("served")
        return
    s = start_served(tmp_path_factory.mktemp("serve-pg"), request.getfixturevalue("pg_cluster").database())
    yield s
    stop_served(s)


def rows(cfg, sql: str, args=()) -> list[tuple]:
    store = FeedbackStore(cfg.db)
    try:
        return store.select(sql, args)
    finally:
        store.close()


def post_photo(client, photo: bytes = CAT, headers=None, **fields):
    data = {**FAST, **{k: str(v) for k, v in fields.items()}}
    return client.post("/v1/captions", files={"image": ("photo.jpg", photo, "image/jpeg")}, data=data,
                       headers=headers or {})


def test_upload_gives_caption_score_model_variant_and_id(served):
    r = post_photo(served["client"], beam_size=3, n_best=2, max_len=20)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["caption"] and body["caption"] == body["caption"].lower() and len(body["caption"].split()) >= 3
    assert isinstance(body["score"], float) and body["score"] < 0
    assert len(body["alternatives"]) == 1 and body["alternatives"][0]["score"] <= body["score"]
    # the served checkpoint's own model name (the shipped default's: its config and encoder)
    assert body["model"] == read_checkpoint(default_model_path())["model"]["name"] and len(body["model_version"]) == 12
    assert body["experiment"] == "exp1" and body["variant"] in ("control", "candidate")
    assert len(body["caption_id"]) == 32 and "attention" not in body


def test_json_batch_of_base64_photos_with_attention(served):
    photos = [CAT] + [small_photo(served["tmp"], s) for s in range(2)]
    r = served["client"].post("/v1/captions", json={
        "images": [base64.b64encode(p).decode() for p in photos], "beam_size": 2, "n_best": 2, "max_len": 8,
        "attention": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3 and len({x["caption_id"] for x in results}) == 3
    assert len({x["variant"] for x in results}) == 1  # one client, one variant
    for x in results:
        att = np.array(x["attention"])
        assert att.shape == (len(x["words"]), 7, 7) and x["caption"] == " ".join(x["words"])
        assert np.allclose(att.sum((1, 2)), 1.0, atol=1e-3)
        assert len(x["alternatives"]) == 1


def test_a_variant_with_its_own_search_captions_as_the_library_does(served):
    r = served["client"].post("/v1/captions", json={
        "images": [base64.b64encode(CAT).decode()], "model": "candidate", "beam_size": 3, "max_len": 20,
        "attention": True})
    assert r.status_code == 200, r.text
    x = r.json()["results"][0]
    assert x["variant"] == "candidate"
    att = np.array(x["attention"])
    assert att.shape == (len(x["words"]), 7, 7) and np.allclose(att.sum((1, 2)), 1.0, atol=1e-3)
    library = Captioner.load(served["tmp"] / "models" / "candidate.pt")
    assert (library.model.length_penalty, library.model.no_repeat_ngram) == (0.5, 0)
    assert x["caption"] == library.caption(REPO / "examples" / "cat.jpg", beam_size=3, max_len=20).text


def test_api_key_is_required_and_checked(served):
    bare = httpx.Client(base_url=served["url"], timeout=30)
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer " + KEY[:-1]}):
        r = bare.post("/v1/captions", files={"image": ("p.jpg", CAT, "image/jpeg")}, headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert KEY not in r.text
    assert bare.get("/v1/models").status_code == 401
    r = bare.post("/v1/captions", files={"image": ("p.jpg", CAT, "image/jpeg")}, data=FAST,
                  headers={"Authorization": "Bearer " + KEY})
    assert r.status_code == 200
    assert bare.get("/healthz").status_code == 200  # liveness stays open
    bare.close()


@pytest.mark.parametrize("photo, status, code", [
    (b"<html>not a photo</html>", 415, "unsupported_image"),
    (b"", 422, "empty_image"),
    (CAT[:len(CAT) // 3], 422, "undecodable_image"),  # header fine, pixels cut off
    (png_header(3000, 3000), 413, "too_many_pixels"),  # over this server's 4M limit, judged from the header
    (png_header(60000, 60000), 413, "too_many_pixels"),  # a decompression bomb: 3.6 billion pixels
])
def test_bad_photos_get_clear_json_errors(served, photo, status, code):
    r = post_photo(served["client"], photo)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code and r.json()["detail"].startswith("image:")


def test_other_formats_are_refused_by_name(served):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="TIFF")
    r = post_photo(served["client"], buf.getvalue())
    assert r.status_code == 415 and "TIFF" in r.json()["detail"]
    r = served["client"].post("/v1/captions", content=b"hello", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"


def test_limits_on_body_batch_and_search(served):
    client = served["client"]
    r = post_photo(client, b"\xff" * 2_100_000)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"

    def chunks():  # no Content-Length: the limit must stop the stream as it arrives
        for _ in range(40):
            yield b"x" * 100_000
    r = client.post("/v1/captions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"

    tiny = base64.b64encode(small_photo(served["tmp"], 0)).decode()
    r = client.post("/v1/captions", json={"images": [tiny] * 5})
    assert r.status_code == 413 and "at most 4" in r.json()["detail"]
    for fields, word in (({"beam_size": 6}, "beam_size"), ({"max_len": 31}, "max_len"),
                         ({"beam_size": 2, "n_best": 3}, "n_best"), ({"beam_size": 0}, "beam_size")):
        r = client.post("/v1/captions", json={"images": [tiny], **fields})
        assert r.status_code == 422 and word in r.json()["detail"], (fields, r.text)
    r = client.post("/v1/captions", json={"images": ["!!not base64!!"]})
    assert r.status_code == 422 and r.json()["error"] == "invalid_base64" and "images[0]" in r.json()["detail"]
    r = client.post("/v1/captions", json={"images": [tiny, base64.b64encode(b"GIF89a...").decode()]})
    assert r.status_code in (415, 422) and "images[1]" in r.json()["detail"]
    r = client.post("/v1/captions", data={"beam_size": "2"}, files={"other": ("x", b"1")})
    assert r.status_code == 422 and "'image'" in r.json()["detail"]


def test_model_names_cannot_reach_outside_the_model_directory(served):
    for name in ("../../etc/passwd", "candidate.pt", "/etc/passwd"):
        r = post_photo(served["client"], model=name)
        assert r.status_code == 404 and r.json()["error"] == "unknown_model"
    r = post_photo(served["client"], model="candidate")
    assert r.status_code == 200 and r.json()["variant"] == "candidate"


def test_ab_assignment_is_sticky_per_client_and_recorded(served_db):
    served = served_db
    client, cfg = served["client"], served["cfg"]
    photo = small_photo(served["tmp"], 3)
    seen = {}
    for k in range(10):
        cid = f"user-{k}"
        got = {post_photo(client, photo, headers={"X-Client-Id": cid}).json()["variant"] for _ in range(2)}
        assert got == {assign(cfg.experiment, "id:" + cid).name}, cid  # same variant every time
        seen[cid] = got.pop()
    assert set(seen.values()) == {"control", "candidate"}
    # Without X-Client-Id the API key is the client: also sticky.
    by_key = {post_photo(client, photo).json()["variant"] for _ in range(2)}
    assert by_key == {assign(cfg.experiment, "key:" + KEY).name}

    recorded = rows(cfg, "SELECT client, variant, assigned, experiment FROM captions")
    by_client = {}
    for client_col, variant, assigned, experiment in recorded:
        by_client.setdefault(client_col, set()).add(variant)
        assert experiment == "exp1"
    stored = dict(rows(cfg, "SELECT client, variant FROM ab_assignments WHERE experiment = 'exp1'"))
    for cid, variant in seen.items():
        assert by_client[client_hash("id:" + cid)] == {variant}
        assert stored[client_hash("id:" + cid)] == variant  # the assignment every replica reads
    assert not any(KEY in str(r) or "user-1" in str(r) for r in recorded)  # ids and keys only as hashes
    assert not any(KEY in str(r) or "user-1" in str(r) for r in stored.items())


def test_feedback_round_trip_lands_in_the_store(served_db):
    served = served_db
    client, cfg = served["client"], served["cfg"]
    photo = small_photo(served["tmp"], 4)
    cap = post_photo(client, photo).json()
    r = client.post("/v1/feedback", json={"caption_id": cap["caption_id"], "rating": 2,
                                          "correction": "a green square on a white background"})
    assert r.status_code == 200 and r.json()["caption_id"] == cap["caption_id"]
    if not cfg.db.startswith("postgresql://"):
        with sqlite3.connect(cfg.db) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ((rating, correction),) = rows(cfg, "SELECT rating, correction FROM feedback WHERE id = ?",
                                   (r.json()["feedback_id"],))
    ((caption, sha),) = rows(cfg, "SELECT caption, image_sha256 FROM captions WHERE id = ?", (cap["caption_id"],))
    ((stored,),) = rows(cfg, "SELECT bytes FROM images WHERE sha256 = ?", (sha,))
    assert (rating, correction) == (2, "a green square on a white background")
    assert caption == cap["caption"] and bytes(stored) == photo
    store = FeedbackStore(cfg.db)
    assert any(c.caption_id == cap["caption_id"] and c.image == photo for c in store.corrections())
    store.close()

    assert client.post("/v1/feedback", json={"caption_id": "nope", "rating": 3}).status_code == 404
    assert client.post("/v1/feedback", json={"caption_id": cap["caption_id"], "rating": 9}).status_code == 422
    r = client.post("/v1/feedback", json={"caption_id": cap["caption_id"]})
    assert r.status_code == 422 and "rating" in r.json()["detail"]


def test_concurrent_requests_share_model_calls(served):
    client = served["client"]
    photo = small_photo(served["tmp"], 5)
    post_photo(client, photo)  # warm: connections open, photo decoded once
    before = client.get("/healthz").json()
    start = threading.Barrier(8)

    def send(_):
        start.wait()  # all eight at once
        return post_photo(client, photo).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(send, range(8)))
    after = client.get("/healthz").json()
    assert codes == [200] * 8
    calls = after["batches"] - before["batches"]
    assert after["images"] - before["images"] == 8
    assert calls < 8, (before, after)  # some photos shared a model call
    assert after["largest_batch"] > 1
    # where the time went: the model's encoder passes and searches fit inside its busy time,
    # and each of the 8 photos was decoded by a request thread
    spent = {k: after[k] - before[k] for k in ("encode_s", "search_s", "decode_s", "model_busy_s")}
    assert spent["encode_s"] > 0 and spent["search_s"] > 0 and spent["decode_s"] > 0, spent
    assert spent["encode_s"] + spent["search_s"] <= spent["model_busy_s"] + 2e-3, spent  # each rounded to 1 ms
    assert after["photos_decoded"] - before["photos_decoded"] == 8


def test_models_listing_and_docs(served):
    client = served["client"]
    models = client.get("/v1/models").json()
    assert models["experiment"] == "exp1"
    assert [v["name"] for v in models["variants"]] == ["control", "candidate"]
    assert all(len(v["version"]) == 12 for v in models["variants"])
    # how each variant captions: the candidate is the default with a search of its own
    assert all(v["precision"] in ("fp32", "bf16") for v in models["variants"])
    # nothing promoted or retired: the config's weights take new traffic
    assert [(v["status"], v["new_traffic_weight"]) for v in models["variants"]] == [("live", 1.0), ("live", 1.0)]
    from captioner.service.serve import swagger_assets

    docs = client.get("/docs")  # served from the swagger-ui-bundle package; off without it
    assert ("swagger" in docs.text.lower()) if swagger_assets() else docs.status_code == 404
    assert client.get("/redoc").status_code == 404  # no pinned package ships ReDoc's script
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/captions"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert "CaptionRequest" in spec["components"]["schemas"] and "/v1/feedback" in spec["paths"]


def test_cli_serve_starts_answers_and_stops(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "captioner.cli", "serve", "--port", str(port), "--db",
                             str(tmp_path / "c.db")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "CAPTIONER_API_KEYS": ""})
    try:
        deadline, up = time.time() + 90, False
        while time.time() < deadline and not up:
            try:
                up = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.3)
        assert up, "captioner serve did not come up"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/captions", files={"image": ("c.jpg", CAT, "image/jpeg")},
                       data=FAST, timeout=60)
        assert r.status_code == 200 and r.json()["variant"] == "default"  # open: no keys configured
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert "Uvicorn running on http://127.0.0.1:" in out
    assert (tmp_path / "c.db").is_file()
