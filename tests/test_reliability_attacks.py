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
    from captioner.service.config import load_serve_config
    from captioner.service.serve import create_app
    from servers import tiny_checkpoint, write_config

    (tmp / "models").mkdir(exist_ok=True)
    if not (tmp / "models" / "tiny.pt").exists():
        tiny_checkpoint(tmp / "models" / "tiny.pt")
    fields = {"model_dir": "models", "db": "feedback.db", "api_keys": [KEY], "max_images": 4,
              "experiment": {"name": "rel", "variants": [{"name": "tiny", "checkpoint": "tiny.pt"}]}, **fields}
    return create_app(load_serve_config(write_config(tmp / "serve.json", **fields)))


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
    from captioner.models.checkpoint import read_checkpoint, write_checkpoint
    from conftest import REPO

    ckpt = read_checkpoint(default_model_path())
    CRAFTED_CLI[case][0](ckpt)
    write_checkpoint(ckpt, tmp_path / "crafted.pt")
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
    assert "--seed applies to sampling only" in capsys.readouterr().err
    assert main(["caption", str(photo), "--top-p", "0.9", "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "work without --out only" in capsys.readouterr().err
    assert main(["caption", str(photo), "--top-p", "0.9", "--temperature", "1", "--seed", "3",
                 "--max-len", "5"]) == 0
    assert capsys.readouterr().out.strip()
