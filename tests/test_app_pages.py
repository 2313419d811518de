"""The web app's page through Streamlit's own test driver (no browser): beam size 1, a
non-image upload, a scan bomb upload and the API keys (issue 35)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from corpus import CAT, scan_bomb  # noqa: E402
from servers import tiny_checkpoint, write_config  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "src" / "captioner" / "service" / "app.py"
KEY = "app-key-5c2b"


def page(tmp_path: Path, monkeypatch, **fields) -> AppTest:
    (tmp_path / "models").mkdir(exist_ok=True)
    tiny_checkpoint(tmp_path / "models" / "tiny.pt")
    cfg = write_config(tmp_path / "serve.json", model_dir="models", db="feedback.db",
                       experiment={"name": "app", "variants": [{"name": "tiny", "checkpoint": "tiny.pt"}]},
                       **fields)
    monkeypatch.setattr(sys, "argv", [str(APP), "--config", str(cfg)])
    monkeypatch.delenv("CAPTIONER_API_KEYS", raising=False)
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    return at


def example(at: AppTest):
    return next(s for s in at.selectbox if s.label.startswith("...or pick"))


def caption_text(at: AppTest) -> str:
    return next((m.value for m in at.markdown if 'id="caption-text"' in m.value), "")


def test_beam_size_1_captions_without_the_alternatives_slider(tmp_path, monkeypatch):
    at = page(tmp_path, monkeypatch)
    assert not at.exception
    at.sidebar.slider[0].set_value(1).run()  # "min_value and max_value are both set to 0" before
    assert not at.exception, at.exception
    assert [s.label for s in at.sidebar.slider] == ["Beam size"]
    example(at).set_value("cat.jpg").run()
    assert not at.exception and not at.error, (at.exception, at.error)
    assert caption_text(at)


@pytest.mark.parametrize("name, data, says", [("notes.jpg", b"these are not pixels\n" * 20, "not an image"),
                                              ("bomb.jpg", scan_bomb(64, 500), "too many scans")])
def test_an_upload_the_loader_refuses_gets_a_friendly_error(tmp_path, monkeypatch, name, data, says):
    at = page(tmp_path, monkeypatch)
    at.file_uploader[0].upload(name, data, "image/jpeg").run()
    assert not at.exception, at.exception  # was: "cannot identify image file" raised by st.image
    assert len(at.error) == 1 and at.error[0].value.startswith(f"Cannot open {name}: ") and says in at.error[0].value
    assert not at.image and not caption_text(at)


def test_an_upload_is_shown_as_the_loader_decoded_it(tmp_path, monkeypatch):
    at = page(tmp_path, monkeypatch)
    at.file_uploader[0].upload("cat.jpg", CAT, "image/jpeg").run()
    assert not at.exception and not at.error
    assert at.image and caption_text(at)


def test_with_api_keys_the_app_asks_for_one_and_does_nothing_without_it(tmp_path, monkeypatch):
    at = page(tmp_path, monkeypatch, api_keys=[KEY])
    assert not at.exception
    assert [t.label for t in at.sidebar.text_input] == ["API key"]
    assert not at.file_uploader and not at.sidebar.selectbox  # nothing to caption with, nothing stored
    at.sidebar.text_input[0].set_value("wrong").run()
    assert "valid API key" in at.sidebar.warning[0].value and not at.file_uploader
    at.sidebar.text_input[0].set_value(KEY).run()
    assert not at.exception and at.file_uploader and not at.sidebar.warning
    example(at).set_value("cat.jpg").run()
    assert caption_text(at)


def test_a_server_that_allows_only_beam_size_1_shows_no_beam_slider(tmp_path, monkeypatch):
    at = page(tmp_path, monkeypatch, max_beam_size=1)
    assert not at.exception, at.exception  # was: "min_value and max_value are both set to 1"
    assert not at.sidebar.slider
    example(at).set_value("cat.jpg").run()
    assert not at.exception and not at.error, (at.exception, at.error)
    assert caption_text(at)


@pytest.mark.parametrize("checkpoint, data, says", [("bad.pt", b"not a checkpoint at all\n" * 10, "bad.pt"),
                                                    ("missing.pt", None, "checkpoint 'missing.pt' not found")])
def test_the_app_command_refuses_a_variant_it_cannot_load_before_streamlit_starts(tmp_path, monkeypatch, capsys,
                                                                                 checkpoint, data, says):
    import subprocess

    from captioner.cli import main

    (tmp_path / "models").mkdir()
    if data is not None:
        (tmp_path / "models" / checkpoint).write_bytes(data)
    cfg = write_config(tmp_path / "serve.json", model_dir="models", db="feedback.db",
                       experiment={"name": "app", "variants": [{"name": "v", "checkpoint": checkpoint}]})

    def never(*args, **kwargs):
        raise AssertionError("streamlit started on a config whose variant cannot load")

    monkeypatch.setattr(subprocess, "Popen", never)
    assert main(["app", "--config", str(cfg)]) == 2  # was: streamlit started, the page showed a stack trace
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and len(err.strip().splitlines()) == 1, err
