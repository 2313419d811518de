import json

import pytest


from captioner.cli import expand_paths, main

from conftest import REPO

EXAMPLES = REPO / "examples"


def test_caption_json_prints_one_object_per_image(capsys):
    assert main(["caption", str(EXAMPLES / "cat.jpg"), str(EXAMPLES / "coffee.jpg"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"].split("/")[-1] for r in rows] == ["cat.jpg", "coffee.jpg"]
    for r in rows:
        assert len(r["caption"].split()) >= 3 and r["score"] < 0


def test_caption_folder_expands_to_its_images(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "b.jpg").write_bytes((EXAMPLES / "cat.jpg").read_bytes())
    (tmp_path / "a.png").write_bytes(b"")
    assert [p.name for p in expand_paths([str(tmp_path)])] == ["a.png", "b.jpg"]


def test_bad_image_gets_an_error_and_the_others_are_still_captioned(tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_text("<html>")
    code = main(["caption", str(bad), str(EXAMPLES / "cat.jpg"), "--json"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "broken.jpg" in err and "error" in err
    assert [json.loads(x)["image"].split("/")[-1] for x in out.splitlines()] == ["cat.jpg"]


def test_n_best_and_attention_figure(tmp_path, capsys):
    fig = tmp_path / "att.png"
    assert main(["caption", str(EXAMPLES / "cat.jpg"), "--n-best", "3", "--attention", str(fig)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[1].startswith("    alt")
    assert fig.stat().st_size > 10_000


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["caption", str(EXAMPLES / "cat.jpg"), "--model", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    assert "show-attend-tell" in capsys.readouterr().out


def test_evaluate_json_last_line_has_toolkit_keys(tiny_data, tmp_path, capsys):
    out = tmp_path / "caps.json"
    code = main(["evaluate", "--data", str(tiny_data), "--split", "test", "--cache-dir", str(tmp_path / "c"),
                 "--captions-out", str(out), "--json", "--beam-size", "2"])
    assert code == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(scores) >= {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert all(0 <= v <= 10 for v in scores.values())
    rows = json.loads(out.read_text())
    assert len(rows) == 6 and all(r["caption"] and len(r["references"]) == 5 for r in rows)


def test_prepare_reports_splits(tiny_data, tmp_path, capsys):
    assert main(["prepare", "--data", str(tiny_data), "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "train:     12 images      60 captions" in out and "vocab:" in out


def test_bad_data_folder_exit_code_and_message(tmp_path, capsys):
    assert main(["prepare", "--data", str(tmp_path / "none")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err


def test_sampling_is_repeatable_with_a_seed_and_ranked(capsys):
    args = ["caption", str(EXAMPLES / "cat.jpg"), "--json", "--temperature", "0.8", "--top-p", "0.9",
            "--n-best", "3", "--seed", "7"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == first
    scores = [first["score"]] + [a["score"] for a in first["alternatives"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)


def test_temperature_zero_gives_the_greedy_caption(capsys):
    assert main(["caption", str(EXAMPLES / "coffee.jpg"), "--json", "--temperature", "0"]) == 0
    sampled = json.loads(capsys.readouterr().out)["caption"]
    assert main(["caption", str(EXAMPLES / "coffee.jpg"), "--json", "--beam-size", "1",
                 "--no-repeat-ngram", "0", "--objects", "off"]) == 0  # sampling names no object either
    assert json.loads(capsys.readouterr().out)["caption"] == sampled


BAD_SEARCH = {  # option values the search once took silently (wrong output, exit 0) or crashed on
    "length_penalty_nan": (["--length-penalty", "nan"], "length_penalty nan is out of range"),
    "length_penalty_inf": (["--length-penalty", "inf"], "length_penalty inf is out of range"),
    "no_repeat_ngram": (["--no-repeat-ngram", "-1"], "no_repeat_ngram -1 is out of range"),
    "threshold_nan": (["--objects-threshold", "nan"], "objects threshold nan is out of range"),
    "threshold_5": (["--objects-threshold", "5"], "objects threshold 5.0 is out of range"),
    "seed_huge": (["--temperature", "1", "--seed", "9" * 23], "seed 9999"),
    "device": (["--out", "x.jsonl", "--device", "bogus"], "device 'bogus' is not one captioner runs on"),
}


@pytest.mark.parametrize("case", sorted(BAD_SEARCH))
def test_search_options_out_of_range_are_refused_before_any_photo(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, says = BAD_SEARCH[case]
    assert main(["caption", str(EXAMPLES / "cat.jpg"), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and says in err, err


@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--batch-size", "-1"], ["--workers", "-1"]])
def test_counts_out_of_range_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["caption", str(EXAMPLES / "cat.jpg"), *args])
    assert e.value.code == 2 and "out of range" in capsys.readouterr().err


def test_paths_the_system_refuses_are_errors_not_tracebacks(tmp_path, capsys):
    long_name = tmp_path / ("x" * 300 + ".jpg")
    assert main(["caption", str(long_name), str(EXAMPLES / "cat.jpg")]) == 1  # cat.jpg is still captioned
    out, err = capsys.readouterr()
    assert "cat.jpg" in out and "error: " in err
    assert main(["caption", str(EXAMPLES / "cat.jpg"), "--attention", str(tmp_path)]) == 2
    assert "--attention" in capsys.readouterr().err
    assert main(["export", "default", str(tmp_path / "o.pt"), "--metrics", str(tmp_path / "nosuch.json")]) == 2
    assert "--metrics" in capsys.readouterr().err and not (tmp_path / "o.pt").exists()
    assert main(["export", "default", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_export_refuses_what_the_loader_would_and_keeps_the_old_file(tmp_path, capsys):
    good = tmp_path / "mine.pt"
    assert main(["export", "default", str(good), "--half"]) == 0
    before = good.read_bytes()
    capsys.readouterr()
    assert main(["export", str(good), str(good), "--no-repeat-ngram", "-1"]) == 2
    assert "no_repeat_ngram" in capsys.readouterr().err and good.read_bytes() == before


def test_an_output_that_is_also_an_input_is_refused(tmp_path, capsys):
    """`average a.pt last.pt --out last.pt` once replaced a run's training state without a word."""
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert main(["export", "default", str(a)]) == 0 and main(["export", "default", str(b)]) == 0
    before = b.read_bytes()
    capsys.readouterr()
    for cmd in (["average", str(a), str(b), "--out", str(b)], ["ensemble", str(a), str(b), "--out", str(b)],
                ["evaluate", "--checkpoint", str(b), "--captions-out", str(b), "--data", str(tmp_path)]):
        assert main(cmd) == 2
        assert "it is also an input" in capsys.readouterr().err
    assert b.read_bytes() == before


def test_compare_names_a_captions_file_no_parser_can_read(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["compare", str(deep), str(deep)]) == 2
    assert "nested too deeply" in capsys.readouterr().err
