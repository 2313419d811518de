"""benchmarks/learning_curve.py trains a recipe on the first N train photos and scores each run;
benchmarks/same_run.py tells whether a rerun reproduced a run."""
import json
import shutil

import pytest
import torch

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
    assert {r["config"] for r in rows} == {str(tmp / "recipe.json")}  # each row names its recipe
    block = module.readme_block(rows)
    assert f"Recipe `{tmp / 'recipe.json'}`" in block
    assert block.count("\n| 3 |") + block.count("\n| 6 |") == 2 and "per doubling" in block
    assert "reaches 0.65 at about" in block or "never reaches 0.65" in block
    assert module.photos_for({"intercept": 0.0, "cider_per_doubling": 0.1}, 1.0) == 1000  # 2 ** 10, to 100s
    assert module.photos_for({"intercept": 0.0, "cider_per_doubling": 0.1}, 0.5) == 32
    assert module.photos_for({"intercept": 0.5, "cider_per_doubling": 0.0}, 1.0) is None  # a flat line
    assert module.photos_for({"intercept": 0.0, "cider_per_doubling": 0.001}, 1.0) is None  # 2 ** 1000 photos
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
    # a run made before a field existed ran with its default: it is still the recipe
    older = {k: v for k, v in {**config, "max_train_images": 0}.items() if k != "encoder_lr_scale"}
    (full / "config.json").write_text(json.dumps(older))
    rows = module.main(args + ["--sizes", "", "--full-run", str(full)])
    assert [r["train_images"] for r in rows] == [6, 12]  # every train photo of the generated set (2 of each of 6 kinds)
    assert module.fit(rows)["cider_per_doubling"] == pytest.approx(
        (rows[1]["test"]["CIDEr"] - rows[0]["test"]["CIDEr"]) / (module.math.log2(12) - module.math.log2(6)), abs=1e-4)


def test_full_run_must_be_a_run_folder(curve, capsys):
    module, args, tmp = curve
    with pytest.raises(SystemExit):
        module.main(args + ["--full-run", str(tmp / "nowhere")])
    assert "no config.json there" in capsys.readouterr().err


def test_same_run_compares_weights_and_scores_but_not_timings(tmp_path):
    same_run = load_benchmark("same_run")
    state = {"w": torch.arange(6, dtype=torch.float16).view(2, 3), "b": torch.zeros(2, dtype=torch.float16)}
    torch.save({"decoder_state": state}, tmp_path / "a.pt")
    torch.save({"decoder_state": {k: v.clone() for k, v in state.items()}}, tmp_path / "b.pt")
    torch.save({"decoder_state": {**state, "b": torch.ones(2, dtype=torch.float16)}}, tmp_path / "c.pt")
    for name, seconds, cider in (("x", 10, 0.5), ("y", 99, 0.5), ("z", 10, 0.6)):
        run = tmp_path / name
        run.mkdir()
        run.joinpath("metrics.jsonl").write_text("\n".join(json.dumps(
            {"epoch": e, "train_seconds": seconds, "dev": {"CIDEr": cider if e == 2 else 0.4}}) for e in (1, 2)))
        run.joinpath("test_scores.json").write_text(json.dumps({"CIDEr": cider}))
    report = same_run.main([str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--runs", str(tmp_path / "x"),
                            str(tmp_path / "y"), "--out", str(tmp_path / "same.json")])
    assert report["same"] and report["weights"] == {"tensors": 2, "parameters": 8, "differ": []}
    assert json.loads((tmp_path / "same.json").read_text()) == report
    report = same_run.main([str(tmp_path / "a.pt"), str(tmp_path / "c.pt"), "--runs", str(tmp_path / "x"),
                            str(tmp_path / "z")])
    assert not report["same"] and report["weights"]["differ"] == ["b"]
    assert report["runs"]["epochs_differ"] == [2] and not report["runs"]["test_scores_equal"]
    report = same_run.main(["--epochs-only", str(tmp_path / "x"), str(tmp_path / "y")])  # timings differ only
    assert report["same"] and report["epochs"] == [2, 2] and "weights" not in report
    report = same_run.main(["--epochs-only", str(tmp_path / "x"), str(tmp_path / "z")])
    assert not report["same"] and report["epochs_differ"] == [2]
    with pytest.raises(SystemExit):
        same_run.main([str(tmp_path / "a.pt")])  # one model file and no --epochs-only
    torch.save({"weights": state}, tmp_path / "foreign.pt")
    with pytest.raises(SystemExit, match="foreign.pt: not a captioner model file"):
        same_run.main([str(tmp_path / "a.pt"), str(tmp_path / "foreign.pt")])


def test_a_refit_recipe_is_refused_before_anything_trains(curve):
    module, args, tmp = curve
    recipe = tmp / "recipe.json"
    recipe.write_text(json.dumps({**json.loads(recipe.read_text()), "train_on_dev": True}))
    with pytest.raises(SystemExit):
        module.main(args + ["--sizes", "3"])
    assert not (tmp / "runs").exists()


def test_a_block_the_readme_lacks_is_refused_before_anything_trains(curve, capsys):
    module, args, tmp = curve
    with pytest.raises(SystemExit):
        module.main([a for a in args if a != "--no-readme"] + ["--sizes", "3", "--block", "no-such-curve"])
    assert "<!-- no-such-curve:start -->" in capsys.readouterr().err and not (tmp / "runs").exists()


def test_a_results_file_holds_one_recipes_rows(curve):
    module, args, tmp = curve
    module.main(args + ["--sizes", "3"])
    other = tmp / "other.json"
    other.write_text((tmp / "recipe.json").read_text())
    with pytest.raises(SystemExit, match=r"curve\.json: its rows are of the recipe .*recipe\.json, not .*other\.json"):
        module.main([str(other) if a == str(tmp / "recipe.json") else a for a in args] + ["--sizes", "6"])
    assert not (tmp / "runs" / "n6").exists()
    rows = json.loads((tmp / "curve.json").read_text())
    with pytest.raises(SystemExit, match="more than one recipe"):
        module.readme_block(rows + [{**rows[0], "config": str(other), "train_images": 6}])


def test_readme_learning_curve_blocks_match_their_results_files_and_kept_runs():
    """Each block is its results file's, and every run kept beside it (benchmarks/results/<file
    stem>/nN/config.json) trained the recipe the rows name on N photos, nothing else changed."""
    module = load_benchmark("learning_curve")
    recipe_runs = load_benchmark("recipe_runs")
    from captioner.training.config import load_train_config

    readme = (REPO / "README.md").read_text()
    for block, results in (("learning-curve", "learning_curve.json"),
                           ("learning-curve-tuned", "learning_curve-tuned.json")):
        rows = json.loads((REPO / "benchmarks" / "results" / results).read_text())
        assert module.readme_block(rows).strip() in readme, block
        recipe = load_train_config(REPO / module.recipe_of(rows, results)).to_dict()
        kept = REPO / "benchmarks" / "results" / results.removesuffix(".json")
        for r in rows:
            run = kept / f"n{r['train_images']}"
            if run.is_dir():
                assert recipe_runs.differences(run, recipe, module.WHERE) == "", run
                assert json.loads((run / "config.json").read_text())["max_train_images"] == r["train_images"]
