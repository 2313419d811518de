"""benchmarks/mirror_views.py: both settings scored on dev and test, and the rule applied to dev."""
import json

import pytest

from conftest import REPO, load_benchmark

bench = load_benchmark("mirror_views")


def test_the_rule_needs_a_dev_cider_gain_above_the_margin_and_no_bleu_loss():
    off = {"CIDEr": 0.600, "Bleu_4": 0.230}
    assert bench.verdict(off, {"CIDEr": 0.615, "Bleu_4": 0.231})["adopt"]
    assert not bench.verdict(off, {"CIDEr": 0.605, "Bleu_4": 0.240})["adopt"]  # gain within the margin
    assert not bench.verdict(off, {"CIDEr": 0.630, "Bleu_4": 0.229})["adopt"]  # BLEU-4 fell
    assert bench.verdict(off, {"CIDEr": 0.615, "Bleu_4": 0.231})["dev_cider_gain"] == 0.015


def test_scores_both_settings_on_both_splits(tiny_data, tmp_path):
    search = tmp_path / "search.json"
    search.write_text(json.dumps({"best_length_penalty": 1.0, "best_no_repeat_ngram": 3}))
    out = tmp_path / "views.json"
    result = bench.main(["--checkpoint", str(REPO / "src/captioner/weights/default.pt"), "--search", str(search),
                         "--data", str(tiny_data), "--cache-dir", str(tmp_path / "c"), "--beam-size", "2",
                         "--captions-dir", str(tmp_path / "caps"), "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for split in ("dev", "test"):
        row = result[split]
        assert row["captions"] == 6 and 0 <= row["captions_changed"] <= 6
        assert row["gain"]["CIDEr"] == round(row["on"]["CIDEr"] - row["off"]["CIDEr"], 4)
    assert result["rule"] == bench.verdict(result["dev"]["off"], result["dev"]["on"])
    assert (result["length_penalty"], result["no_repeat_ngram"]) == (1.0, 3)
    block = bench.readme_block(result, "x.json").splitlines()
    assert block[2].startswith("| off | ") and block[3].startswith("| on | ")
    assert f"{result['test']['on']['CIDEr']:.3f} |" in block[3]
    assert ("**adopted**" in block[-1]) == result["rule"]["adopt"] and "Source: `x.json`" in block[-1]


def test_readme_quotes_the_results_file():
    source = "benchmarks/results/tuned-mirror/mirror_views.json"
    result = json.loads((REPO / source).read_text())
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- mirror-views:start -->")[1].split("<!-- mirror-views:end -->")[0]
    assert block.strip() == bench.readme_block(result, source).strip(), \
        "run: python benchmarks/mirror_views.py --readme-only"
    assert result["rule"] == bench.verdict(result["dev"]["off"], result["dev"]["on"])


def test_readme_without_the_block_is_refused_before_anything_is_scored(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "missing_block", lambda name: f"README.md has no <!-- {name}:start --> block")
    with pytest.raises(SystemExit):  # not the missing checkpoint's error: nothing was loaded yet
        bench.main(["--checkpoint", str(tmp_path / "none.pt"), "--search", str(tmp_path / "none.json"), "--readme"])
    assert "README.md has no <!-- mirror-views:start --> block" in capsys.readouterr().err
