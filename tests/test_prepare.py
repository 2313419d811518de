"""`captioner prepare` checks and reports before training; any prepared dataset trains and
evaluates end to end; on the real Flickr8k copy both layouts prepare to the same data."""
import json
import shutil

import pytest

from captioner.cli import main

from builders import make_coco, make_manifest
from conftest import FLICKR8K, needs_flickr8k


def test_report_lists_every_problem_by_file_and_line_and_stops(tmp_path, capsys):
    path, pics = make_manifest(tmp_path / "m", "csv")
    photos = path.parent / "photos"
    (photos / pics[4][0].split("/")[1]).write_text("<html>not a photo</html>")  # unreadable
    shutil.copy(photos / pics[0][0].split("/")[1], photos / "copy.jpg")  # byte-identical to a train photo
    long = " ".join(["word"] * 40)
    with open(path, "a") as f:
        f.write('photos/copy.jpg,"a red square .",test\n')
        f.write('photos/gone.jpg,"a photo that is not there",train\n')
        f.write(f'{pics[1][0]},"",train\n')
        f.write(f'{pics[1][0]},"{long}",train\n')
    n_lines = len(path.read_text().splitlines())
    code = main(["prepare", "--data", str(path), "--no-features", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2 and "--drop-bad" in err
    assert f"manifest.csv, line {n_lines - 2}: image photos/gone.jpg not found" in out
    assert f"manifest.csv, line {n_lines - 1}: empty caption for {pics[1][0]}" in out
    assert f"line 22: image {pics[4][0]}" in out and "not a readable image" in out  # its first row
    assert "1 missing, 1 unreadable, 1 group(s) of byte-identical files (1 across splits)" in out
    assert f"duplicate: {pics[0][0]}, photos/copy.jpg" in out
    assert "1 empty, 0 without words, 1 over 30 words" in out
    assert "caption length (words):" in out and ">30" in out and "caption words covered" in out
    assert not (tmp_path / "prep").exists()

    code = main(["prepare", "--data", str(path), "--no-features", "--no-progress", "--drop-bad",
                 "--out", str(tmp_path / "prep"), "--json"])
    out = capsys.readouterr().out
    assert code == 0 and "dropped: 2 photo(s)" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["problem_counts"] == {"missing image": 1, "empty caption": 1, "unreadable image": 1}
    saved = json.loads((tmp_path / "prep" / "dataset.json").read_text())
    images = {r["image"] for r in saved["records"]}
    assert "photos/gone.jpg" not in images and pics[4][0] not in images and "photos/copy.jpg" in images
    assert len(json.loads((tmp_path / "prep" / "report.json").read_text())["problems"]) == 3


@pytest.mark.slow
def test_manifest_trains_and_evaluates_end_to_end_also_on_a_coco_set(tmp_path, tiny_model_file, capsys):
    path, pics = make_manifest(tmp_path / "mine", "jsonl")
    cache = str(tmp_path / "cache")
    assert main(["prepare", "--data", str(path), "--out", str(tmp_path / "prep"), "--cache-dir", cache,
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "train:     10 images      50 captions" in out and "features:" in out
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "prep"), "--model", str(tiny_model_file), "--out", str(run),
                 "--cache-dir", cache, "--epochs", "2", "--batch-size", "10", "--no-progress",
                 "--set", "min_word_count=1", "--set", "warmup_steps=2", "--set", "lr=0.01",
                 "--set", "val_beam_size=2", "--set", "val_max_len=6", "--set", "encoder=", "--set", "mirror_prob=0",
                 "--set", "scst_epochs=0", "--set", "scst_soup=1"]) == 0
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and history[1]["train_loss"] < history[0]["train_loss"]
    capsys.readouterr()
    # The manifest's own test split, then a COCO-format set made only for evaluation (all of it)
    for data, split, n in ((str(path), "test", 4), (str(make_coco(tmp_path / "coco", n_train=0, n_val=1)[1]["val"][0]),
                                                    "all", 6)):
        caps = tmp_path / f"caps-{split}.json"
        assert main(["evaluate", "--data", data, "--split", split, "--checkpoint", str(run / "best.pt"),
                     "--cache-dir", cache, "--beam-size", "2", "--captions-out", str(caps), "--json"]) == 0
        scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert {"Bleu_4", "CIDEr", "ROUGE_L"} <= set(scores) and all(v >= 0 for v in scores.values())
        rows = json.loads(caps.read_text())
        assert len(rows) == n and all(r["caption"] and len(r["references"]) == 5 for r in rows)


@needs_flickr8k()
@pytest.mark.flickr8k
def test_real_flickr8k_both_layouts_prepare_identical_data(tmp_path, capsys):
    for layout in ("token", "csv"):
        assert main(["prepare", "--data", str(FLICKR8K), "--layout", layout, "--out", str(tmp_path / layout),
                     "--check-images", "header", "--no-features", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("train:   6000 images   30000 captions") == 2 and "problems: none" in out
    token, csv_ = ((tmp_path / layout / "dataset.json").read_bytes() for layout in ("token", "csv"))
    assert token == csv_
    assert len(json.loads(token)["records"]) == 8000
