"""The server's and the web app's config (serve.toml / JSON): every value that would fail later,
far from the file (a dead model worker, an open server, every photo refused), is refused at
load, naming the file and the field."""
from __future__ import annotations

import json
import re

import pytest

from captioner.errors import ConfigError
from captioner.service.config import RANGES, load_serve_config


def toml(tmp_path, text: str):
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return path


def as_json(tmp_path, text: str):
    path = tmp_path / "serve.json"
    path.write_text(text)
    return path


def refused(path, *says: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_serve_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: "), message
    for s in says:
        assert s in message, message
    return message


# --- numbers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    "max_wait_ms = inf",  # was: every model worker died (OverflowError in queue.get), then 503s for ever
    "max_wait_ms = nan", "max_wait_ms = 1e13", "max_wait_ms = 60001",
    "threads = 100000000000000000000",  # was: torch.set_num_threads overflow at startup
    "model_workers = 1000000000",  # was: startup hangs starting threads
    "decode_workers = 100000", "request_timeout_s = inf", "request_timeout_s = 1e300", "body_timeout_s = nan",
    "body_deadline_s = 0.0", "max_batch = 1000000000", "encode_chunk = 1000000", "max_images = 1000000000",
    "max_pixels = 1000000000000", "max_body_bytes = 1000000000000000", "max_scans = 1000000000",
    "max_beam_size = 65", "max_n_best = 1000", "max_len = 100000", "max_in_flight = 1000000000",
    "keep_alive_s = 1000000000", "max_connections = 1000000000", "db_pool = 1000000", "port = 70000",
    "max_batch = 0", "max_wait_ms = -1",
])
def test_a_number_out_of_its_range_is_refused_naming_the_field(tmp_path, line):
    name = line.split()[0]
    refused(toml(tmp_path, line + "\n"), f"field {name}: must be a finite number")


def test_json_infinities_are_refused_too(tmp_path):
    for text in ('{"max_wait_ms": 1e400}', '{"max_wait_ms": Infinity}', '{"request_timeout_s": NaN}'):
        refused(as_json(tmp_path, text), "must be a finite number", "not inf" if "NaN" not in text else "not nan")
    refused(as_json(tmp_path, '{"threads": 1%s}' % ("0" * 5000)), "not valid JSON")  # more digits than Python reads


def test_every_numeric_field_has_a_range_and_its_ends_load(tmp_path):
    from dataclasses import fields

    from captioner.service.config import ServeConfig

    numeric = {f.name for f in fields(ServeConfig) if f.type in ("int", "float")}
    assert numeric == set(RANGES)
    from captioner.inference.api import MAX_BEAM_SIZE

    assert RANGES["max_beam_size"][1] == RANGES["max_n_best"][1] == MAX_BEAM_SIZE  # no limit the search refuses
    high = {name: top for name, (_, top) in RANGES.items()}
    cfg = load_serve_config(as_json(tmp_path, json.dumps(high)))
    assert cfg.max_wait_ms == 60_000 and cfg.threads == 256 and cfg.model_workers == 256


# --- host ------------------------------------------------------------------------------------

def test_an_empty_host_is_refused_not_every_interface(tmp_path):
    refused(toml(tmp_path, 'host = ""\n'), "field host: empty")
    refused(toml(tmp_path, 'host = "  "\n'), "field host: empty")
    with pytest.raises(ConfigError, match="field host: empty"):  # `--host ""` on the command line
        load_serve_config(None, host="")
    assert load_serve_config(toml(tmp_path, 'host = "0.0.0.0"\n')).host == "0.0.0.0"  # said explicitly: fine


# --- API keys --------------------------------------------------------------------------------

@pytest.mark.parametrize("keys, index, says", [
    (["good-key-1", ""], 1, "an empty key"),
    ([" padded-key-7"], 0, "has leading or trailing whitespace"),
    (["padded-key-7\t"], 0, "has leading or trailing whitespace"),
    (["clé-secrète-9"], 0, "holds a character other than printable ASCII at position 2"),
    (["tab\tinside-3"], 0, "holds a character other than printable ASCII at position 3"),
    ([1], 0, "expected a string, not int"),  # was: the key "1"
    (["ok-key-1", True], 1, "expected a string, not bool"),  # was: the key "True"
    ([{"a": "secret-in-a-table"}], 0, "expected a string, not dict"),  # was: the key "{'a': ...}"
])
def test_api_keys_that_could_never_authenticate_are_refused(tmp_path, monkeypatch, keys, index, says):
    monkeypatch.delenv("CAPTIONER_API_KEYS", raising=False)
    message = refused(as_json(tmp_path, json.dumps({"api_keys": keys})), f"field api_keys[{index}]: {says}")
    for k in keys:
        assert not (isinstance(k, str) and k.strip() and k.strip() in message), message  # never echoed
    assert "secret-in-a-table" not in message


def test_api_keys_that_are_not_a_list_are_not_echoed(tmp_path):
    message = refused(toml(tmp_path, 'api_keys = "my-secret-key"\n'), "field api_keys: expected list")
    assert "my-secret-key" not in message


@pytest.mark.parametrize("env, says", [("good-key-1,,good-key-2", "CAPTIONER_API_KEYS[1]: an empty key"),
                                       ("good-key-1,", "CAPTIONER_API_KEYS[1]: an empty key"),
                                       ("good-key-1, good-key-2", "CAPTIONER_API_KEYS[1]: has leading"),
                                       ("schlüssel-1", "CAPTIONER_API_KEYS[0]: holds a character")])
def test_environment_keys_are_held_to_the_same_rules(tmp_path, monkeypatch, env, says):
    monkeypatch.setenv("CAPTIONER_API_KEYS", env)
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_serve_config(toml(tmp_path, "port = 9000\n"))


def test_good_keys_load_from_both_places(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONER_API_KEYS", "env-key-1,env key 2")
    cfg = load_serve_config(as_json(tmp_path, json.dumps({"api_keys": ["file-key-1"]})))
    assert cfg.keys() == ["file-key-1", "env-key-1", "env key 2"]
    monkeypatch.setenv("CAPTIONER_API_KEYS", "")  # set but empty: no keys, as before
    assert load_serve_config(None).keys() == []


# --- the experiment --------------------------------------------------------------------------

def experiment(tmp_path, name: str = "exp", *weights: float):
    variants = [{"name": f"v{i}", "weight": w} for i, w in enumerate(weights or (1.0,))]
    return as_json(tmp_path, json.dumps({"experiment": {"name": name, "variants": variants}}))


def test_weights_must_be_finite_and_add_up_to_a_finite_number(tmp_path):
    refused(experiment(tmp_path, "exp", 1.0, float("inf")), "experiment.variants[1].weight: expected a finite number")
    refused(experiment(tmp_path, "exp", 1e308, 1e308), "experiment.variants: the weights add up")
    cfg = load_serve_config(experiment(tmp_path, "exp", 0.0, 3.0, 1e300))
    assert [v.weight for v in cfg.experiment.variants] == [0.0, 3.0, 1e300]


def test_the_experiment_name_is_held_to_the_stores_text_rules(tmp_path):
    refused(experiment(tmp_path, "exp\x00one"), "experiment.name: holds a control character (U+0000)")
    refused(experiment(tmp_path, "exp\x1b[2J"), "experiment.name: holds a control character (U+001B)")
    refused(experiment(tmp_path, "e" * 101), "experiment.name: is 101 characters long; at most 100")
    assert load_serve_config(experiment(tmp_path, "finetune v2 (May)")).experiment.name == "finetune v2 (May)"


# --- the file --------------------------------------------------------------------------------

def test_a_file_that_is_not_utf8_is_refused_not_a_traceback(tmp_path):
    for name in ("serve.toml", "serve.json"):
        path = tmp_path / name
        path.write_bytes(b"port = 9000\n# caf\xe9\n")
        refused(path, "not UTF-8 text (byte 17")
    refused(tmp_path, "cannot read the config file")  # a folder


def test_a_json_field_given_twice_is_refused(tmp_path):
    # was: the last one won, and this loaded with no keys at all: an open server
    refused(as_json(tmp_path, '{"api_keys": ["a-key-0123"], "api_keys": []}'), "'api_keys' appears twice")
    refused(as_json(tmp_path, '{"experiment": {"name": "e", "variants": [{"name": "a", "weight": 1, "weight": 0}]}}'),
            "'weight' appears twice")


@pytest.mark.parametrize("formats, says", [(["JPGE"], "image_formats[0]: 'JPGE'"),
                                           (["PNG", "jpg"], "image_formats[1]: 'jpg'")])
def test_image_formats_pillow_does_not_know_are_refused(tmp_path, formats, says):
    refused(as_json(tmp_path, json.dumps({"image_formats": formats})), says, "not an image format Pillow knows")


def test_known_image_formats_load_in_any_case(tmp_path):
    cfg = load_serve_config(as_json(tmp_path, json.dumps({"image_formats": ["jpeg", "MPO", "Png"]})))
    assert cfg.image_limits().formats == ("JPEG", "MPO", "PNG")


def test_the_serve_command_says_what_is_wrong_in_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    import captioner.service.serve as serve
    from captioner.cli import main

    def never(cfg):
        raise AssertionError("the server started on a config it should have refused")

    monkeypatch.setattr(serve, "run", never)
    assert main(["serve", "--config", str(toml(tmp_path, "max_wait_ms = inf\n"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "field max_wait_ms" in err and len(err.strip().splitlines()) == 1
