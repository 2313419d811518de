"""benchmarks/encoder_precision.py: both encoder precisions scored on dev and test, the
paired intervals of their difference, and the rule applied to dev's."""
import json

import pytest

from conftest import REPO, load_benchmark

bench = load_benchmark("encoder_precision")


def test_the_rule_needs_both_dev_lower_ends_inside_the_margins():
    assert bench.verdict({"CIDEr": (-0.009, 0.01), "Bleu_4": (-0.004, 0.004)})["adopt"]
    assert not bench.verdict({"CIDEr": (-0.011, 0.01), "Bleu_4": (-0.004, 0.004)})["adopt"]  # CIDEr-D may fall too far
    assert not bench.verdict({"CIDEr": (-0.001, 0.01), "Bleu_4": (-0.006, 0.004)})["adopt"]  # BLEU-4 may fall too far
    assert bench.verdict({"CIDEr": (-0.00912, 0.01), "Bleu_4": (0.0, 0.0)})["dev_cider_low"] == -0.0091


def test_scores_both_settings_on_both_splits(tiny_data, tmp_path):
    search = tmp_path / "search.json"
    search.write_text(json.dumps({"best_length_penalty": 1.0, "best_no_repeat_ngram": 3}))
    out = tmp_path / "precision.json"
    result = bench.main(["--checkpoint", str(REPO / "src/captioner/weights/default.pt"), "--search", str(search),
                         "--data", str(tiny_data), "--cache-dir", str(tmp_path / "c"), "--beam-size", "2",
                         "--captions-dir", str(tmp_path / "caps"), "--resamples", "200", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for split in ("dev", "test"):
        row = result[split]
        assert row["captions"] == 6 and 0 <= row["captions_changed"] <= 6
        cider = next(m for m in row["comparison"] if m["metric"] == "CIDEr")
        assert (cider["a"], cider["b"]) == pytest.approx((row["fp32"]["CIDEr"], row["bf16"]["CIDEr"]), abs=1e-4)
        assert row["interval"]["CIDEr"] == [round(x, 4) for x in cider["diff_interval"]]
    assert result["rule"] == bench.verdict(result["dev"]["interval"])
    assert len(list((tmp_path / "c").glob("*-bf16"))) == 1  # the photos in bf16, cached apart from fp32's
    block = bench.readme_block(result, "x.json").splitlines()
    assert block[2].startswith("| fp32 | ") and block[3].startswith("| bf16 | ")
    assert f"{result['test']['bf16']['CIDEr']:.3f} |" in block[3]
    assert ("**adopted**" in block[-1]) == result["rule"]["adopt"] and "Source: `x.json`" in block[-1]


def test_the_block_quotes_each_settings_timing_files(tmp_path):
    for setting, ms in (("fp32", 13.0), ("bf16", 7.5)):
        for i in (1, 2):
            (tmp_path / f"latency-default-encoder-{setting}-{i}.json").write_text(
                json.dumps({"caption_beam3_ms": 40.0 + i, "encoder_batch8_ms_per_image": ms + i}))
    for i, (setting, rps) in enumerate((("fp32", 30.0), ("bf16", 33.0)), start=1):
        run = {"encode_ms_per_photo": 11.0 if setting == "bf16" else 17.0, "search_ms_per_photo": 10.0}
        slow = {**run, "encode_ms_per_photo": 99.0}  # at a thread count the summary does not show
        (tmp_path / f"serve_load-{i}-{setting}.json").write_text(json.dumps({
            "summary": {"batched": {"throughput_rps": rps, "server_threads": 2},
                        "one_at_a_time": {"throughput_rps": 20.0, "server_threads": 1}},
            "runs": {"batched@2": [run, {**run, "search_ms_per_photo": 11.0}], "batched@1": [slow],
                     "one_at_a_time@1": [{**run, "search_ms_per_photo": 27.0}], "one_at_a_time@2": [slow]}}))
    lines = bench.speed_lines(tmp_path)
    assert "| fp32 | 41.0, 42.0 | 14.0, 15.0 |" in lines and "| bf16 | 41.0, 42.0 | 8.5, 9.5 |" in lines
    first = "| fp32 | serve_load-1-fp32.json | 17.0 + 10.5 | 17.0 + 27.0 | 30.0 / 20.0 | 1.50x |"
    second = "| bf16 | serve_load-2-bf16.json | 11.0 + 10.5 | 11.0 + 27.0 | 33.0 / 20.0 | 1.65x |"
    assert lines.index(first) < lines.index(second)  # as they ran
    assert bench.speed_lines(tmp_path / "none") == []


def test_readme_quotes_the_results_file():
    source = "benchmarks/results/tuned-mirror/encoder_precision.json"
    result = json.loads((REPO / source).read_text())
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- encoder-precision:start -->")[1].split("<!-- encoder-precision:end -->")[0]
    assert block.strip() == bench.readme_block(result, source, bench.SPEED_DIR).strip(), \
        "run: python benchmarks/encoder_precision.py --readme-only"
    assert result["rule"] == bench.verdict(result["dev"]["interval"])


def test_readme_without_the_block_is_refused_before_anything_is_scored(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "missing_block", lambda name: f"README.md has no <!-- {name}:start --> block")
    with pytest.raises(SystemExit):  # not the missing checkpoint's error: nothing was loaded yet
        bench.main(["--checkpoint", str(tmp_path / "none.pt"), "--search", str(tmp_path / "none.json"), "--readme"])
    assert "README.md has no <!-- encoder-precision:start --> block" in capsys.readouterr().err
