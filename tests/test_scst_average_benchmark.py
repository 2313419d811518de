"""benchmarks/scst_average.py: best.pt and the means of a run's SCST epoch weights scored on dev
and test, with paired intervals, and the rule applied to dev."""
import json

import pytest

from conftest import REPO, load_benchmark

bench = load_benchmark("scst_average")


def test_the_rule_needs_a_dev_cider_gain_above_the_margin_and_no_bleu_loss():
    best = {"CIDEr": 0.600, "Bleu_4": 0.230}
    assert bench.verdict(best, {"CIDEr": 0.615, "Bleu_4": 0.231}, "11-13")["adopt"]
    assert not bench.verdict(best, {"CIDEr": 0.605, "Bleu_4": 0.240}, "11-13")["adopt"]  # within the margin
    assert not bench.verdict(best, {"CIDEr": 0.630, "Bleu_4": 0.229}, "11-13")["adopt"]  # BLEU-4 fell
    assert bench.verdict(best, {"CIDEr": 0.615, "Bleu_4": 0.231}, "11-13")["dev_cider_gain"] == 0.015


def trajectory(run: str, best: dict, avg: dict) -> dict:
    return {"run": run, "models": {"best": {"dev": best}, "11-13": {"dev": avg}},
            "rule": bench.verdict(best, avg, "11-13")}


def test_the_pooled_rule_takes_the_mean_gain_and_no_bleu_loss_in_any_trajectory():
    best = {"CIDEr": 0.600, "Bleu_4": 0.230}
    near = trajectory("a", best, {"CIDEr": 0.6093, "Bleu_4": 0.232})  # alone, below the margin
    pooled = bench.pooled_verdict([near, trajectory("b", best, {"CIDEr": 0.612, "Bleu_4": 0.231})])
    assert pooled["adopt"] and pooled["mean_dev_cider_gain"] == pytest.approx(0.01065, abs=1e-4)
    assert pooled["runs"] == ["a", "b"] and pooled["dev_cider_gains"] == [0.0093, 0.012]
    assert not bench.pooled_verdict([near, trajectory("b", best, {"CIDEr": 0.6105, "Bleu_4": 0.231})])["adopt"]
    assert not bench.pooled_verdict([near, trajectory("b", best, {"CIDEr": 0.640, "Bleu_4": 0.229})])["adopt"]
    line = bench.pooled_block(pooled, "p.json")
    assert "`a` +0.0093, `b` +0.0120" in line and "**adopted**" in line and "Source: `p.json`" in line


def test_the_deciding_span_is_the_first_three_scst_epochs():
    assert bench.spans([11, 12, 13, 14]) == {"11-13": [11, 12, 13], "11-14": [11, 12, 13, 14],
                                             "12-14": [12, 13, 14]}
    assert bench.spans([3, 4, 5]) == {"3-5": [3, 4, 5]}
    with pytest.raises(SystemExit, match="first three"):
        bench.spans([3, 4])


def test_scores_best_and_the_averages_on_both_splits(tiny_data, tiny_model_file, tmp_path):
    from test_train_smoke import tiny_config

    from captioner.training.train import train

    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, tiny_model_file, epochs=1, scst_epochs=3, scst_lr=0.01, keep_epochs=True))
    search = tmp_path / "search.json"
    search.write_text(json.dumps({"best_length_penalty": 1.0, "best_no_repeat_ngram": 3}))
    out = tmp_path / "avg.json"
    result = bench.main(["--run", str(run), "--search", str(search), "--data", str(tiny_data), "--beam-size", "2",
                         "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["scst_epochs"] == [2, 3, 4] and result["spans"] == ["2-4"]
    assert (run / "scst-average" / "average-2-4.pt").is_file()
    for split in ("dev", "test"):
        vs = result["models"]["2-4"]["vs_best"][split]["CIDEr"]
        diff = result["models"]["2-4"][split]["CIDEr"] - result["models"]["best"][split]["CIDEr"]
        assert vs["diff"] == pytest.approx(diff, abs=2e-4)  # compare's whole-split scores are evaluate's
        assert vs["interval"][0] <= vs["diff"] <= vs["interval"][1]
    assert result["rule"] == bench.verdict(result["models"]["best"]["dev"], result["models"]["2-4"]["dev"], "2-4")
    block = bench.readme_block(result, "x.json").splitlines()
    assert block[2].startswith(f"| best.pt (epoch {result['best_epoch']}, best dev) |")
    assert block[3].startswith("| mean of epochs 2-4 |")
    assert ("**adopted**" in block[-1]) == result["rule"]["adopt"] and "Source: `x.json`" in block[-1]


def test_a_run_without_kept_epochs_is_refused_naming_the_files(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": n, "phase": p}) + "\n"
                                               for n, p in ((1, "xe"), (2, "scst"), (3, "scst"), (4, "scst"))))
    with pytest.raises(SystemExit):
        bench.main(["--run", str(run), "--search", str(tmp_path / "s.json")])
    err = capsys.readouterr().err
    assert "epoch-2.pt" in err and "keep_epochs=true" in err


def test_readme_quotes_the_results_file():
    source = "benchmarks/results/tuned-mirror/scst_average.json"
    result = json.loads((REPO / source).read_text())
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- scst-average:start -->")[1].split("<!-- scst-average:end -->")[0]
    assert block.strip() == bench.readme_block(result, source).strip(), \
        "run: python benchmarks/scst_average.py --readme-only"
    first = result["spans"][0]
    assert result["rule"] == bench.verdict(result["models"]["best"]["dev"], result["models"][first]["dev"], first)


def test_readme_quotes_the_second_trajectory_and_the_pooled_verdict():
    readme = (REPO / "README.md").read_text()
    source = "benchmarks/results/tuned-mirror/scst_average-seed1.json"
    second = json.loads((REPO / source).read_text())
    block = readme.split("<!-- scst-average-seed1:start -->")[1].split("<!-- scst-average-seed1:end -->")[0]
    assert block.strip() == bench.readme_block(second, source).strip(), \
        f"run: python benchmarks/scst_average.py --readme-only --out {source} --block scst-average-seed1"
    first = json.loads((REPO / "benchmarks/results/tuned-mirror/scst_average.json").read_text())
    pooled_source = "benchmarks/results/tuned-mirror/scst_average-pooled.json"
    pooled = json.loads((REPO / pooled_source).read_text())
    assert pooled == bench.pooled_verdict([first, second])
    block = readme.split("<!-- scst-average-pooled:start -->")[1].split("<!-- scst-average-pooled:end -->")[0]
    assert block.strip() == bench.pooled_block(pooled, pooled_source).strip()


def test_the_soup_rule_needs_the_margin_over_every_best_and_no_bleu_loss():
    bests = [{"CIDEr": 0.591, "Bleu_4": 0.237}, {"CIDEr": 0.595, "Bleu_4": 0.234}]
    rule = bench.soup_verdict(bests, {"CIDEr": 0.6055, "Bleu_4": 0.240})
    assert rule["adopt"] and rule["dev_cider_gains"] == [0.0145, 0.0105]
    assert not bench.soup_verdict(bests, {"CIDEr": 0.604, "Bleu_4": 0.240})["adopt"]  # 0.009 over the second
    assert not bench.soup_verdict(bests, {"CIDEr": 0.630, "Bleu_4": 0.236})["adopt"]  # BLEU-4 below the first's
    assert bench.soups([[11, 12, 13, 14], [1, 2, 3, 4]]) == {
        "first 3 of each": [0, 1, 2], "all of each": [0, 1, 2, 3], "first 2 of each": [0, 1]}
    with pytest.raises(SystemExit, match="first three"):
        bench.soups([[11, 12, 13], [1, 2]])


def test_scores_a_soup_of_two_trajectories_against_each_best(tiny_data, tiny_model_file, tmp_path):
    from test_train_smoke import tiny_config

    from captioner.models.average import average_checkpoint
    from captioner.models.checkpoint import read_checkpoint
    from captioner.training.train import train

    run, second = tmp_path / "run", tmp_path / "second"
    cfg = tiny_config(tiny_data, run, tiny_model_file, epochs=1, scst_epochs=3, scst_lr=0.01, keep_epochs=True)
    train(cfg)
    train(tiny_config(tiny_data, second, tiny_model_file, epochs=0, scst_epochs=3, scst_lr=0.01, keep_epochs=True,
                      seed=1, init_checkpoint=run / "best-xe.pt", cache_dir=run / "cache"))
    search = tmp_path / "search.json"
    search.write_text(json.dumps({"best_length_penalty": 1.0, "best_no_repeat_ngram": 3}))
    out = tmp_path / "soup.json"
    result = bench.main(["--soup", str(run), str(second), "--search", str(search), "--data", str(tiny_data),
                         "--beam-size", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["soups"]["first 3 of each"] == [[2, 3, 4], [1, 2, 3]]
    soup = read_checkpoint(run / "scst-soup" / "soup-first-3-of-each.pt")["decoder_state"]
    mean = average_checkpoint([run / "epochs" / f"epoch-{n}.pt" for n in (2, 3, 4)] +
                              [second / "epochs" / f"epoch-{n}.pt" for n in (1, 2, 3)])["decoder_state"]
    assert all(torch_equal(soup[k], v) for k, v in mean.items())
    for split in ("dev", "test"):
        for i, vs in enumerate(result["models"]["first 3 of each"]["vs_best"][split]):
            diff = result["models"]["first 3 of each"][split]["CIDEr"] - result["models"][f"best {i}"][split]["CIDEr"]
            assert vs["CIDEr"]["diff"] == pytest.approx(diff, abs=2e-4)
    assert result["rule"] == bench.soup_verdict([result["models"][f"best {i}"]["dev"] for i in (0, 1)],
                                                result["models"]["first 3 of each"]["dev"])
    block = bench.soup_block(result, "s.json").splitlines()
    assert block[2].startswith(f"| `{run}` best.pt (epoch {result['best_epochs'][0]}) |")
    assert block[4].startswith("| soup of SCST epochs 2, 3, 4; 1, 2, 3 (first 3 of each) |")
    assert ("**adopted**" in block[-1]) == result["rule"]["adopt"] and "Source: `s.json`" in block[-1]


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_readme_quotes_the_soup_and_its_verdict():
    source = "benchmarks/results/tuned-mirror/scst_soup.json"
    result = json.loads((REPO / source).read_text())
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- scst-soup:start -->")[1].split("<!-- scst-soup:end -->")[0]
    assert block.strip() == bench.soup_block(result, source).strip(), \
        f"run: python benchmarks/scst_average.py --readme-only --out {source} --block scst-soup"
    assert result["rule"] == bench.soup_verdict([result["models"][f"best {i}"]["dev"] for i in (0, 1)],
                                                result["models"]["first 3 of each"]["dev"])
