"""benchmarks/learning_curve.py trains a recipe on the first N train photos and scores each run."""
import json
import shutil

import pytest

from conftest import REPO, load_benchmark, make_flickr_like


@pytest.fixture
def curve(tmp_path, tiny_model_file):
    module = load_benchmark("learning_curve")
    data = make_flickr_like(tmp_path / "data", n_per_kind=4)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({
        "model": str(tiny_model_file), "epochs": 1, "scst_epochs": 1, "batch_size": 8, "warmup_steps": 2,
        "lr": 0.01, "val_beam_size": 2, "val_max_len": 6, "min_word_count": 1, "scst_samples": 2,
        "scst_batch_size": 10, "scst_baseline": "mean"}))
    args = ["--config", str(recipe), "--data", str(data), "--cache-dir", str(tmp_path / "cache"),
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "curve.json"), "--no-readme"]
    return module, args, tmp_path


def test_each_size_trains_on_that_many_photos_and_is_scored_at_both_ends(curve):
    module, args, tmp = curve
    readme_before = (REPO / "README.md").read_text()
    rows = module.main(args + ["--sizes", "3,6"])
    assert [r["train_images"] for r in rows] == [3, 6]
    assert json.loads((tmp / "runs" / "n6" / "config.json").read_text())["max_train_images"] == 6
    assert rows[0]["vocab"] < rows[1]["vocab"]  # fewer photos, fewer kinds of caption seen
    for r in rows:
        assert set(r["xe_test"]) >= {"Bleu_4", "CIDEr"} and set(r["test"]) >= {"Bleu_4", "CIDEr"}
    assert json.loads((tmp / "curve.json").read_text()) == rows
    block = module.readme_block(rows, "recipe.json")
    assert block.count("\n| 3 |") + block.count("\n| 6 |") == 2 and "per doubling" in block
    stamp = (tmp / "runs" / "n6" / "metrics.jsonl").stat().st_mtime_ns
    assert module.main(args + ["--sizes", "6"]) == rows  # a size already measured is not trained again
    assert (tmp / "runs" / "n6" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert (REPO / "README.md").read_text() == readme_before


def test_a_full_run_is_scored_only_if_it_is_the_recipe_on_every_train_photo(curve):
    module, args, tmp = curve
    module.main(args + ["--sizes", "6"])
    full = tmp / "full"
    shutil.copytree(tmp / "runs" / "n6", full)
    config = json.loads((full / "config.json").read_text())
    with pytest.raises(SystemExit, match="a train subset"):
        module.main(args + ["--sizes", "", "--full-run", str(full)])
    (full / "config.json").write_text(json.dumps({**config, "max_train_images": 0, "lr": 0.5}))
    with pytest.raises(SystemExit, match=r"lr=0\.5 \(recipe 0\.01\)"):
        module.main(args + ["--sizes", "", "--full-run", str(full)])
    (full / "config.json").write_text(json.dumps({**config, "max_train_images": 0}))
    rows = module.main(args + ["--sizes", "", "--full-run", str(full)])
    assert [r["train_images"] for r in rows] == [6, 12]  # every train photo of the generated set (2 of each of 6 kinds)
    assert module.fit(rows)["cider_per_doubling"] == pytest.approx(
        (rows[1]["test"]["CIDEr"] - rows[0]["test"]["CIDEr"]) / (module.math.log2(12) - module.math.log2(6)), abs=1e-4)


def test_full_run_must_be_a_run_folder(curve, capsys):
    module, args, tmp = curve
    with pytest.raises(SystemExit):
        module.main(args + ["--full-run", str(tmp / "nowhere")])
    assert "no config.json there" in capsys.readouterr().err
