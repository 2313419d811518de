"""benchmarks/zoo.py trains, scores and times a model end to end (tiny data, one epoch)."""
import importlib.util
import json
import sys

from conftest import REPO, make_flickr_like


def test_zoo_writes_a_scored_row_per_model(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("zoo", REPO / "benchmarks" / "zoo.py")
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    data = make_flickr_like(tmp_path / "data", n_per_kind=3)
    results = tmp_path / "zoo.json"
    readme_before = (REPO / "README.md").read_text()
    args = ["--models", "show-tell", "--epochs", "1", "--data", str(data), "--cache-dir", str(tmp_path / "cache"),
            "--runs", str(tmp_path / "runs"), "--results", str(results), "--no-readme"]
    rows = zoo.main(args)
    assert [r["model"] for r in rows] == ["show-tell"]
    row = json.loads(results.read_text())[0]
    assert set(row["test"]) >= {"Bleu_4", "CIDEr", "ROUGE_L"}
    assert row["params_millions"] > 0 and row["caption_beam3_ms"] > 0
    assert "show-tell (efficientnet-lite0, 1+0 epochs; measured)" in zoo.readme_block(rows)
    assert zoo.main(args) == rows  # a pair already measured is not run again
    assert (REPO / "README.md").read_text() == readme_before
    sys.modules.pop("latency", None), sys.modules.pop("model_card", None)
