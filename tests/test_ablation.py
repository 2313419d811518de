"""benchmarks/ablation.py trains the recipe's cross-entropy stage with one setting changed at a
time, then SCST from each variant's best weights, and writes the README table of what helped."""
import json

import pytest

from conftest import REPO, load_benchmark, make_flickr_like


@pytest.fixture
def ablation(tmp_path, tiny_model_file):
    module = load_benchmark("ablation")
    data = make_flickr_like(tmp_path / "data", n_per_kind=3)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({
        "model": str(tiny_model_file), "epochs": 2, "scst_epochs": 1, "batch_size": 8, "warmup_steps": 2,
        "lr": 0.01, "val_beam_size": 2, "val_max_len": 6, "min_word_count": 1, "scst_samples": 2,
        "scst_batch_size": 10, "scst_baseline": "mean", "label_smoothing": 0.0}))
    args = ["--config", str(recipe), "--data", str(data), "--cache-dir", str(tmp_path / "cache"),
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "ablation.json"), "--scst-epochs", "1",
            "--no-readme"]
    return module, args, tmp_path


def test_each_variant_changes_one_setting_and_scst_starts_from_its_best_weights(ablation):
    module, args, tmp = ablation
    readme_before = (REPO / "README.md").read_text()
    rows = module.main(args + ["--variants", "recipe,label-smoothing"])
    assert [r["variant"] for r in rows] == ["recipe", "label-smoothing"]
    runs = tmp / "runs"
    recipe_xe = json.loads((runs / "recipe" / "xe" / "config.json").read_text())
    smoothed_xe = json.loads((runs / "label-smoothing" / "xe" / "config.json").read_text())
    assert recipe_xe["scst_epochs"] == 0 and recipe_xe["label_smoothing"] == 0.0
    assert {k for k in recipe_xe if recipe_xe[k] != smoothed_xe[k]} == {"label_smoothing", "out"}
    scst = json.loads((runs / "label-smoothing" / "scst" / "config.json").read_text())
    assert scst["epochs"] == 0 and scst["scst_epochs"] == 1
    assert scst["init_checkpoint"] == str(runs / "label-smoothing" / "xe" / "best.pt")
    for r in rows:
        assert r["xe"]["epochs"] == 2 and r["scst"]["epochs"] == 1
        assert r["xe"]["best_dev_CIDEr"] == max(r["xe"]["dev_CIDEr"])
        assert set(r["xe"]["test"]) >= {"Bleu_4", "CIDEr"} and set(r["scst"]["test"]) >= {"Bleu_4", "CIDEr"}
    assert json.loads((tmp / "ablation.json").read_text()) == rows
    assert {r["config"] for r in rows} == {str(tmp / "recipe.json")}  # each row names its recipe
    block = module.readme_block(rows)
    assert f"Recipe `{tmp / 'recipe.json'}`" in block
    assert "| recipe | nothing (the recipe) |" in block and "| label-smoothing | `label_smoothing=0.1` |" in block
    versus = rows[1]["scst"]["best_dev_CIDEr"] - rows[0]["scst"]["best_dev_CIDEr"]
    assert f"| {versus:+.3f} |" in block.splitlines()[3]
    stamp = (runs / "recipe" / "scst" / "metrics.jsonl").stat().st_mtime_ns
    assert module.main(args + ["--variants", "recipe"]) == rows  # a variant already measured is not trained again
    assert (runs / "recipe" / "scst" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert (REPO / "README.md").read_text() == readme_before


def test_a_recipe_run_stands_for_the_cross_entropy_stage_only_if_it_learned_it_the_same_way(ablation):
    from captioner.training.config import load_train_config
    from captioner.training.train import train

    module, args, tmp = ablation
    full = tmp / "full"
    config = tmp / "recipe.json"
    train(load_train_config(config, [f"data={tmp / 'data'}", f"out={full}", f"cache_dir={tmp / 'cache'}",
                                     "progress=false"]))
    saved = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({**saved, "warmup_steps": 0}))
    with pytest.raises(SystemExit, match=r"warmup_steps=0 \(recipe 2\)"):
        module.main(args + ["--variants", "recipe", "--recipe-run", str(full)])
    # its SCST settings are not the cross-entropy stage's: they may differ
    (full / "config.json").write_text(json.dumps({**saved, "scst_lr": 0.5, "scst_epochs": 3}))
    rows = module.main(args + ["--variants", "recipe", "--recipe-run", str(full)])
    assert rows[0]["xe_run"] == str(full) and not (tmp / "runs" / "recipe" / "xe").exists()
    scst = json.loads((tmp / "runs" / "recipe" / "scst" / "config.json").read_text())
    assert scst["init_checkpoint"] == str(full / "best-xe.pt")


def test_bad_arguments_are_refused_before_anything_trains(ablation, capsys):
    module, args, tmp = ablation
    with pytest.raises(SystemExit):
        module.main(args + ["--variants", "recipe,dropout"])
    assert "unknown dropout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.main(args + ["--recipe-run", str(tmp / "nowhere")])
    assert "no config.json there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.main([a for a in args if a != "--no-readme"] + ["--block", "no-such-table"])
    assert "<!-- no-such-table:start -->" in capsys.readouterr().err
    recipe = tmp / "recipe.json"
    settings = json.loads(recipe.read_text())
    recipe.write_text(json.dumps({**settings, "final_lr_ratio": 1.0}))  # what no-decay would change
    with pytest.raises(SystemExit):
        module.main(args + ["--variants", "recipe,no-decay"])
    assert "no-decay: changes nothing in the recipe (final_lr_ratio=1.0)" in capsys.readouterr().err
    recipe.write_text(json.dumps({**settings, "train_on_dev": True}))
    with pytest.raises(SystemExit):
        module.main(args)
    assert "refit recipe" in capsys.readouterr().err and not (tmp / "runs").exists()


def test_a_results_file_of_another_recipe_is_refused_before_anything_trains(ablation):
    module, args, tmp = ablation
    (tmp / "ablation.json").write_text(json.dumps([{"variant": "recipe", "config": "configs/other.json"}]))
    with pytest.raises(SystemExit, match=r"ablation\.json: its rows are of the recipe configs/other\.json"):
        module.main(args + ["--variants", "no-warmup"])
    assert not (tmp / "runs").exists()


def test_readme_ablation_block_matches_its_results_file_and_kept_runs():
    """The block is its results file's, and each variant's kept stages (benchmarks/results/
    ablation/<variant>/{xe,scst}/config.json) are the rows' recipe with that variant's overrides."""
    from captioner.training.config import NOT_LEARNED, load_train_config

    module = load_benchmark("ablation")
    recipe_runs = load_benchmark("recipe_runs")
    rows = json.loads((REPO / "benchmarks" / "results" / "ablation.json").read_text())
    assert {r["variant"] for r in rows} == set(module.VARIANTS)
    block = module.readme_block(rows)
    assert block.strip() in (REPO / "README.md").read_text()
    recipe = REPO / recipe_runs.recipe_of(rows, "ablation.json")
    kept = REPO / "benchmarks" / "results" / "ablation"
    for r in rows:
        for stage, extra, ignore in (("xe", ["scst_epochs=0"], set()),
                                     ("scst", ["epochs=0", f"scst_epochs={r['scst']['epochs']}"], {"init_checkpoint"})):
            run = kept / r["variant"] / stage
            if (run / "config.json").is_file():  # the recipe's cross-entropy stage is tuned-mirror's own run
                wanted = load_train_config(recipe, [*r["overrides"], *extra]).to_dict()
                assert recipe_runs.differences(run, wanted, NOT_LEARNED | ignore) == "", run
