"""What the REST API refuses before any work, the same on both store backends: strings with
control characters (PostgreSQL refuses NUL in text, SQLite does not), unknown fields and fields
given twice, in JSON bodies and upload forms alike; each gets 422 naming the field, and nothing
already stored is lost."""
from __future__ import annotations

import base64
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from captioner.service.config import load_serve_config  # noqa: E402
from captioner.service.feedback import FeedbackStore, Served  # noqa: E402
from captioner.service.serve import create_app  # noqa: E402

from conftest import REPO  # noqa: E402

CAT = (REPO / "examples" / "cat.jpg").read_bytes()
PHOTO = base64.b64encode(CAT).decode()


@pytest.fixture
def api(store_db):
    """(client, the id of a caption already in the store, the store): a server on each backend,
    with no model loaded (every request here is refused before a model would run)."""
    store = FeedbackStore(store_db)
    cid = store.record_caption(Served("api", "c", "default", "default", True, "m", "1", "a cat", -1.0, {}))
    store.add_feedback(cid, rating=4)
    with TestClient(create_app(load_serve_config(db=store_db), models={})) as client:
        yield client, cid, store
    store.close()


def refused(r, field: str) -> str:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_request" and field in body["detail"], body
    return body["detail"]


def test_control_characters_get_422_naming_the_field_on_both_backends(api):
    client, cid, store = api
    detail = refused(client.post("/v1/feedback", json={"caption_id": cid, "correction": "a cat\u0000 on a mat"}),
                     "correction")
    assert "U+0000" in detail
    refused(client.post("/v1/feedback", json={"caption_id": "x\u0000y", "rating": 3}), "caption_id")
    refused(client.post("/v1/feedback", json={"caption_id": cid, "correction": "a bell \u0007"}), "correction")
    # a lone surrogate is not UTF-8: neither database can store it
    r = client.post("/v1/feedback", content=json.dumps({"caption_id": cid, "correction": "a \ud800 cat"}),
                    headers={"Content-Type": "application/json"})
    assert "surrogate" in refused(r, "correction")
    refused(client.post("/v1/captions", json={"images": [PHOTO], "model": "control\u0000"}), "model")
    refused(client.post("/v1/captions", files={"image": ("a.jpg", CAT)}, data={"model": "a\u001bb"}), "model")
    assert store.select("SELECT COUNT(*) FROM feedback") == [(1,)]  # nothing stored, nothing lost
    # tabs and newlines are text
    r = client.post("/v1/feedback", json={"caption_id": cid, "correction": "a cat\ton a\r\nmat"})
    assert r.status_code == 200, r.text
    assert store.select("SELECT rating, correction FROM feedback ORDER BY id") == [
        (4, None), (None, "a cat\ton a\r\nmat")]


def test_unknown_and_repeated_fields_get_422_naming_them(api):
    client, cid, store = api
    for extra in ({"temperature": 1.0}, {"length_penalty": 0.5}, {"foo": 1}):
        (name,) = extra
        detail = refused(client.post("/v1/captions", json={"images": [PHOTO], **extra}), name)
        assert "unknown field" in detail and "beam_size" in detail  # says what the body takes
    refused(client.post("/v1/feedback", json={"caption_id": cid, "rating": 3, "comment": "nice"}), "comment")
    for url, body in (("/v1/captions", f'{{"images": ["{PHOTO}"], "beam_size": 1, "beam_size": 2}}'),
                      ("/v1/feedback", f'{{"caption_id": "{cid}", "rating": 1, "rating": 5}}')):
        field = "beam_size" if "beam_size" in body else "rating"
        detail = refused(client.post(url, content=body, headers={"Content-Type": "application/json"}), field)
        assert "more than once" in detail
    detail = refused(client.post("/v1/captions", files={"image": ("a.jpg", CAT)}, data={"foo": "1"}), "foo")
    assert "unknown field" in detail and "beam_size" in detail
    detail = refused(client.post("/v1/captions", files={"image": ("a.jpg", CAT)}, data={"beam_size": ["1", "2"]}),
                     "beam_size")
    assert "2 times" in detail
    r = client.post("/v1/feedback", content=f"caption_id={cid}&rating=3",
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type", r.text
    assert store.select("SELECT COUNT(*) FROM feedback") == [(1,)]
    # a body without a type is read as JSON, as before
    r = client.post("/v1/feedback", content=json.dumps({"caption_id": cid, "rating": 5}))
    assert r.status_code == 200, r.text


def test_the_schema_states_strict_bodies(api):
    client, _, _ = api
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert schemas["CaptionRequest"]["additionalProperties"] is False
    assert schemas["FeedbackRequest"]["additionalProperties"] is False
    body = spec["paths"]["/v1/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/FeedbackRequest"}
