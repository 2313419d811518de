"""Hardening, round 2 (issue 35): what an attacker, a slow client or a bad checkpoint tried.

Scan bombs through the CLI and the server, slow bodies and the order of auth, crafted
checkpoints, lax request types, the API docs' assets, and RNG-isolated model construction.
The slow ones (a real server, the CLI with the shipped model) are marked `reliability`.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from captioner.cli import main
from captioner.data.images import ImageLimits, jpeg_scans, load_image
from captioner.errors import ImageError

from corpus import CAT, encode, scan_bomb, two_colour
from reliability import count


# --- 1. progressive-JPEG scan bombs ----------------------------------------------------------

def test_scans_are_counted_from_the_bytes_without_decoding():
    assert jpeg_scans(CAT) == 1  # baseline
    progressive = encode(two_colour(), "JPEG", progressive=True)
    assert 2 <= jpeg_scans(progressive) <= 12
    bomb = scan_bomb(64, 500)
    assert jpeg_scans(bomb) == 500 and jpeg_scans(bomb, stop_after=100) == 101
    assert jpeg_scans(b"not a jpeg") == 0 and jpeg_scans(CAT[:200]) == 0 and jpeg_scans(b"\xff\xd8\xff") == 0


def test_a_scan_bomb_is_refused_before_decoding_by_every_caller():
    bomb = scan_bomb()  # 3000 x 3000, 4000 scans: ~20 s of decoding if it were decoded
    with pytest.raises(ImageError, match=r"bomb.jpg: too many scans") as e:
        load_image(bomb, name="bomb.jpg")
    assert e.value.kind == "too_many_scans"
    assert load_image(scan_bomb(64, 50), name="ok.jpg").size == (64, 64)  # within the cap: decoded
    with pytest.raises(ImageError, match="more than 20 scans"):
        load_image(scan_bomb(64, 50), ImageLimits(max_scans=20))
    count("inputs", 3)


@pytest.mark.reliability
def test_cli_names_the_scan_bomb_and_still_captions_the_good_photo(tmp_path, capsys):
    bomb, good = tmp_path / "bomb.jpg", tmp_path / "good.jpg"
    bomb.write_bytes(scan_bomb())
    good.write_bytes(CAT)
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(
        code=main(["caption", str(bomb), str(good), "--beam-size", "1", "--max-len", "8"])), daemon=True)
    worker.start()
    worker.join(120)  # a hang guard, not a timing: unguarded, the bomb alone decodes for ~20 s
    assert not worker.is_alive(), "still decoding the bomb"
    out, err = capsys.readouterr()
    assert box["code"] == 1
    assert err.strip().splitlines() == [f"error: {bomb}: too many scans: this JPEG holds more than 100 scans "
                                        f"(each one is a decoding pass over every pixel; photos have about 10), "
                                        f"so it is not decoded"]
    assert out.startswith(f"{good}: ") and len(out.strip().splitlines()) == 1
    count("inputs", 2)


# --- the server, through real uvicorn with a tiny model ----------------------------------------

KEY = "attacks-key-7d1e"


def make_app(tmp: Path, **fields):
    from servers import tiny_app

    return tiny_app(tmp, KEY, **fields)


@pytest.fixture
def running(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from servers import Running

    made: list = []

    def start(**fields):
        made.append(Running(make_app(tmp_path, **fields)))
        return made[-1]

    yield start
    for r in made:
        r.stop()


def post_photo(url: str, data: bytes, name: str, timeout: float, key: str | None = KEY):
    import httpx

    count("requests")
    return httpx.post(url + "/v1/captions", files={"image": (name, data, "image/jpeg")},
                      data={"beam_size": "1", "max_len": "5"}, headers={"X-API-Key": key} if key else {},
                      timeout=timeout)


@pytest.mark.reliability
def test_server_refuses_two_concurrent_scan_bombs_and_then_captions_a_good_photo(running):
    """Two bombs at once used to hold both decode slots (~20 s each here); now both get 413 from
    their scan count and the good photo after them is captioned. The client's 20 s timeout is
    the issue's bound, a hang guard rather than a timing."""
    server = running()
    bomb = scan_bomb()
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda i: post_photo(server.url, bomb, f"bomb{i}.jpg", 20), range(2)))
    for i, r in enumerate(answers):
        assert r.status_code == 413 and r.json()["error"] == "too_many_scans", r.text
        assert r.json()["detail"].startswith("image: too many scans")
    r = post_photo(server.url, CAT, "cat.jpg", 20)
    assert r.status_code == 200 and r.json()["caption"], r.text


# --- 3. crafted checkpoints through the CLI -----------------------------------------------------

CRAFTED_CLI = {
    "weights_package": (lambda c: c["encoder"].update(weights_package="planted"), "encoder.weights_package"),
    "image_size_100000": (lambda c: c["encoder"].update(image_size=100_000), "encoder.image_size"),
    "image_size_0": (lambda c: c["encoder"].update(image_size=0), "encoder.image_size"),
    "std_0": (lambda c: c["encoder"].update(std=0.0), "encoder.std"),
    "length_penalty_nan": (lambda c: c["decode"].update(length_penalty=float("nan")), "decode.length_penalty"),
}


@pytest.mark.reliability
@pytest.mark.parametrize("case", sorted(CRAFTED_CLI))
def test_cli_refuses_a_crafted_checkpoint_in_one_line_and_imports_nothing(tmp_path, case):
    """`python -m captioner.cli` puts the current folder first on sys.path: run from the
    checkpoint's folder, a weights_package naming the module planted beside it used to import
    (run) it. Each crafted field is now refused in one line naming it, nothing imported."""
    import os
    import subprocess
    import sys

    from captioner.inference.api import default_model_path
    from captioner.models.checkpoint import read_checkpoint
    from builders import write_unchecked
    from conftest import REPO

    ckpt = read_checkpoint(default_model_path())
    CRAFTED_CLI[case][0](ckpt)
    write_unchecked(ckpt, tmp_path / "crafted.pt")
    marker = tmp_path / "IMPORTED"
    (tmp_path / "planted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (tmp_path / "cat.jpg").write_bytes(CAT)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "captioner.cli", "caption", "--model", "crafted.pt", "cat.jpg"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # a hang guard
    count("inputs")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: crafted.pt: refused: field " + CRAFTED_CLI[case][1]), lines
    assert "Traceback" not in proc.stderr and not proc.stdout
    assert not marker.exists(), "the planted module was imported"


# --- 7. model construction never moves the global RNG -------------------------------------------

def test_building_the_tuned_encoder_top_leaves_the_global_rng_alone():
    """`_fold` (cached: first called at an arbitrary moment) and TunedTop built EfficientNets
    with `from_name`, drawing from torch's global RNG: a run resumed with its RNG restored then
    drew different numbers from one that ran straight. Building a CaptionModel with the tuned
    encoder now moves the RNG exactly as much as building its decoder alone does."""
    import torch

    from captioner.data.vocab import Vocab
    from captioner.models.decoders import build_decoder
    from captioner.models.encoders import TunedTop, _fold, get_encoder_config
    from captioner.models.model import CaptionModel, ModelConfig
    from conftest import TINY_MODEL

    tuned = get_encoder_config("efficientnet-lite0-tuned")
    _fold.cache_clear()
    torch.manual_seed(1)
    before = torch.get_rng_state()
    assert tuned.cache_fold == 2 and isinstance(TunedTop(tuned), TunedTop)
    assert torch.equal(torch.get_rng_state(), before)

    vocab = Vocab.build(["a red square", "a blue circle"], min_count=1)
    cfg = ModelConfig.from_dict({**TINY_MODEL, "encoder": tuned.name})
    torch.manual_seed(1)
    build_decoder(cfg.decoder, cfg.decoder_params, len(vocab), tuned.region_dim)
    decoder_alone = torch.get_rng_state()
    _fold.cache_clear()
    torch.manual_seed(1)
    CaptionModel(cfg, vocab, tuned)
    assert torch.equal(torch.get_rng_state(), decoder_alone)


# --- 8. --top-p without --temperature -----------------------------------------------------------

def test_top_p_without_a_temperature_is_an_error_not_ignored(tmp_path, capsys):
    from captioner.errors import OptionError
    from captioner.inference.api import Captioner

    captioner = Captioner.load()
    with pytest.raises(OptionError, match=r"top_p 0.5 is out of range: it applies to sampling only"):
        captioner.check_search(top_p=0.5)
    with pytest.raises(OptionError, match="top_p"):
        captioner.caption(CAT, top_p=0.5)
    captioner.check_search(top_p=0.5, temperature=1.0)  # sampling: fine
    captioner.check_search(top_p=None)
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(CAT)
    assert main(["caption", str(photo), "--top-p", "0.9"]) == 2
    assert capsys.readouterr().err.startswith("error: top_p 0.9 is out of range: it applies to sampling only")
    assert main(["caption", str(photo), "--seed", "3"]) == 2
    assert "seed applies to sampling only" in capsys.readouterr().err
    assert main(["caption", str(photo), "--top-p", "0.9", "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "work without --out only" in capsys.readouterr().err
    assert main(["caption", str(photo), "--top-p", "0.9", "--temperature", "1", "--seed", "3",
                 "--max-len", "5"]) == 0
    assert capsys.readouterr().out.strip()


# --- 2. slow bodies and the order of auth -------------------------------------------------------

def raw_request(port: int, head: bytes, body: bytes = b"", drip: bytes = b"", every_s: float = 0.0,
                wait_s: float = 60) -> bytes:
    """Send `head` and `body`, then `drip` a byte at a time every `every_s`; return the reply
    (what came back before the server closed, or `wait_s` passed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(head + body)
        reply = b""
        sock.setblocking(False)
        end = time.monotonic() + wait_s
        i = 0
        while time.monotonic() < end:
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
                if b"\r\n\r\n" in reply and reply.rstrip().endswith(b"}"):
                    break
            except BlockingIOError:
                pass
            except (ConnectionResetError, BrokenPipeError):
                break
            if i < len(drip):
                try:
                    sock.send(drip[i:i + 1])
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    pass
                i += 1
            time.sleep(every_s or 0.05)
        return reply


def head(path: str, length: int, key: str | None = KEY, ctype: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {length}\r\n"
            + (f"X-API-Key: {key}\r\n" if key else "") + "\r\n").encode()


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def test_the_default_body_deadline_is_within_the_issue_bound():
    from captioner.service.config import ServeConfig

    assert ServeConfig().body_deadline_s <= 30 and ServeConfig().body_timeout_s <= 30


@pytest.mark.reliability
def test_a_body_trickling_a_byte_at_a_time_is_cut_off_at_the_total_deadline(running):
    """Never idle as long as the stall timeout (20 s), but never done either: cut off with 408
    once the body deadline (2 s here, 25 s by default) has passed since the request began."""
    server = running(body_deadline_s=2.0, body_timeout_s=20.0)
    reply = raw_request(server.port, head("/v1/captions", 200_000), b'{"images": ["', drip=b"A" * 2000,
                        every_s=0.2, wait_s=60)
    count("requests")
    count("faults")
    assert status_of(reply) == 408, reply[:300]
    body = json.loads(reply.partition(b"\r\n\r\n")[2])
    assert body == {"error": "body_timeout", "detail": "the request body did not arrive within 2 s"}


@pytest.mark.reliability
def test_keyless_requests_get_401_before_their_body_is_read_and_cannot_starve_keyed_ones(running):
    import httpx

    server = running(max_in_flight=2, body_timeout_s=20.0)
    # keyless feedback gets 401 whatever its body: junk, valid or never sent
    for body in (b"junk{", json.dumps({"caption_id": "x", "rating": 3}).encode()):
        r = httpx.post(server.url + "/v1/feedback", content=body, headers={"Content-Type": "application/json"})
        count("requests")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
    # four keyless clients that promise 200 kB and send one byte: answered at once, holding no slot
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: raw_request(server.port, head("/v1/captions", 200_000, key=None), b"{",
                                                      wait_s=15), range(4)))
    count("requests", 4)
    assert [status_of(r) for r in replies] == [401] * 4
    # while four more keyless slow clients are connected, a keyed client is captioned
    socks = []
    try:
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(head("/v1/captions", 200_000, key=None) + b"{")
            socks.append(s)
        r = post_photo(server.url, CAT, "cat.jpg", 30)
        assert r.status_code == 200, r.text
    finally:
        for s in socks:
            s.close()


@pytest.mark.reliability
def test_a_client_that_hangs_up_mid_body_is_not_an_internal_error(running, caplog):
    import logging

    server = running()
    with caplog.at_level(logging.INFO, logger="captioner.service.serve"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head("/v1/captions", 5000, ctype="multipart/form-data; boundary=b")
                         + b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\nxx")
            time.sleep(0.5)
        end = time.monotonic() + 20
        while time.monotonic() < end and not any("disconnected" in r.getMessage() for r in caplog.records):
            time.sleep(0.1)
    count("faults")
    messages = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "captioner.service.serve"]
    assert ("INFO", "client disconnected before its request body arrived: POST /v1/captions") in messages, messages
    assert not any(level == "ERROR" for level, _ in messages), messages
    assert "Traceback" not in caplog.text


# --- 5. strict request types, limits in the schema ----------------------------------------------

@pytest.mark.reliability
def test_lax_types_get_422_and_the_schema_states_the_limits(running):
    import base64

    import httpx

    server = running(max_beam_size=6, max_len=30, max_n_best=4, max_images=3)
    c = httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60)
    photo = base64.b64encode(CAT).decode()
    cases = [("/v1/feedback", {"caption_id": "x", "rating": True}), ("/v1/feedback", {"caption_id": "x", "rating": "3"}),
             ("/v1/feedback", {"caption_id": "x", "rating": 3.0}), ("/v1/feedback", {"caption_id": 5, "rating": 3}),
             ("/v1/captions", {"images": [photo], "beam_size": True}),
             ("/v1/captions", {"images": [photo], "max_len": "5"}),
             ("/v1/captions", {"images": [photo], "attention": "yes"}),
             ("/v1/captions", {"images": [photo], "attention": 1})]
    for url, body in cases:
        r = c.post(url, json=body)
        count("requests")
        assert r.status_code == 422 and r.json()["error"] == "invalid_request", (body, r.text)
    for field, value in (("beam_size", "true"), ("attention", "maybe"), ("max_len", "5.0")):
        r = c.post("/v1/captions", files={"image": ("a.jpg", CAT)}, data={field: value})
        count("requests")
        assert r.status_code == 422 and field in r.json()["detail"], (field, r.text)
    schema = c.get("/openapi.json").json()
    props = schema["components"]["schemas"]["CaptionRequest"]["properties"]
    assert (props["beam_size"]["maximum"], props["max_len"]["maximum"], props["n_best"]["maximum"],
            props["images"]["maxItems"]) == (6, 30, 4, 3)
    form = schema["paths"]["/v1/captions"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {k: form["properties"][k]["maximum"] for k in ("beam_size", "max_len", "n_best")} == \
        {"beam_size": 6, "max_len": 30, "n_best": 4}
    c.close()


# --- 6. the API docs' assets come from the server itself ----------------------------------------

@pytest.mark.reliability
def test_docs_reference_only_assets_the_server_serves(running):
    import re

    import httpx

    pytest.importorskip("swagger_ui_bundle")
    server = running()
    page = httpx.get(server.url + "/docs")  # no key needed for the docs
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", page.text) + \
        re.findall(r"""url:\s*["']([^"']+)["']""", page.text)
    assert len(refs) >= 4, refs
    for ref in refs:
        assert ref.startswith("/") and not ref.startswith("//"), f"{ref} is not on this server"
        r = httpx.get(server.url + ref)
        count("requests")
        assert r.status_code == 200 and r.content, ref
    css = httpx.get(server.url + "/docs/assets/swagger-ui.css").text
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", css)  # no fonts or images from elsewhere
    assert httpx.get(server.url + "/redoc").status_code in (401, 404)  # off: no local ReDoc assets
