"""`captioner caption DIR --out captions.jsonl`: batched, parallel, resumable, alt-text CSV."""
import csv
import json

import pytest

from captioner.inference import bulk
from captioner.cli import main

from builders import photos


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "photos"
    photos(d, n_per_kind=1)  # 6 photos
    photos(d / "sub", n_per_kind=1, start=100)  # 6 more in a subfolder
    return d


def test_folder_to_jsonl_with_alt_text_and_a_bad_photo(folder, tmp_path, capsys):
    (folder / "broken.jpg").write_text("<html>")
    out, alt = tmp_path / "caps.jsonl", tmp_path / "alt.csv"
    code = main(["caption", str(folder), "--recursive", "--out", str(out), "--alt-text-csv", str(alt),
                 "--batch-size", "4", "--workers", "2", "--beam-size", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "broken.jpg" in err and "12 photo(s)" in err and "images/s" in err
    rows = lines(out)
    assert sorted(r["image"] for r in rows) == sorted(p.relative_to(folder).as_posix()
                                                      for p in folder.rglob("0*.jpg"))
    assert all(len(r["caption"].split()) >= 2 and r["score"] < 0 for r in rows)
    with open(alt) as f:
        table = list(csv.reader(f))
    assert table[0] == ["image", "alt_text"] and len(table) == 13
    assert {r["image"]: r["caption"] for r in rows} == dict(table[1:])
    # The same photos captioned one at a time, as `captioner caption --json` does, agree.
    assert main(["caption", str(folder / "00000_redsquare.jpg"), "--json", "--beam-size", "2"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert {r["image"]: r["caption"] for r in rows}["00000_redsquare.jpg"] == single["caption"]


def test_rerun_after_a_kill_skips_done_photos_and_never_duplicates(folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "caps.jsonl"
    args = ["caption", str(folder), "--out", str(out), "--batch-size", "2", "--workers", "0",
            "--beam-size", "1", "--no-progress"]
    real = bulk.Captioner.caption_features
    calls = {"n": 0}

    def dies_on_third_batch(self, feats, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, feats, **kw)

    monkeypatch.setattr(bulk.Captioner, "caption_features", dies_on_third_batch)
    assert main(args) == 130
    assert len(lines(out)) == 4
    with open(out, "a") as f:
        f.write('{"image": "00005_greencircle.jpg", "capt')  # a line cut by the kill
    monkeypatch.setattr(bulk.Captioner, "caption_features", real)
    capsys.readouterr()
    assert main(args) == 0
    assert "4 of 6 photo(s) already in" in capsys.readouterr().err
    rows = lines(out)
    assert len(rows) == 6 and len({r["image"] for r in rows}) == 6
    before = out.read_bytes()
    assert main(args) == 0  # nothing left to do: the file is untouched
    assert out.read_bytes() == before
    assert "captioned 0 photo(s)" in capsys.readouterr().err


def test_leftover_parts_of_a_distributed_run_are_joined_once(tmp_path):
    out = tmp_path / "caps.jsonl"
    out.write_text('{"image": "a.jpg", "caption": "x"}\n')
    (tmp_path / "caps.jsonl.part-rank0").write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg", '
                                                    '"caption": "y"}\n{"image": "c.j')
    (tmp_path / "caps.jsonl.part-rank1").write_text('{"image": "d.jpg", "caption": "z"}\n')
    assert bulk.join_parts(out) == 2
    assert [r["image"] for r in lines(out)] == ["a.jpg", "b.jpg", "d.jpg"]
    assert not list(tmp_path.glob("*.part-rank*"))


def test_a_damaged_line_in_the_middle_is_an_error_not_a_silent_redo(tmp_path, capsys):
    photos(tmp_path / "p", n_per_kind=1)
    out = tmp_path / "caps.jsonl"
    out.write_text('{"image": "a.jpg", "caption": "x"}\nnot json\n{"image": "b.jpg", "caption": "y"}\n')
    before = out.read_bytes()
    assert main(["caption", str(tmp_path / "p"), "--out", str(out), "--no-progress"]) == 2
    assert "caps.jsonl, line 2" in capsys.readouterr().err
    assert out.read_bytes() == before


@pytest.mark.parametrize("content", [b"my notes\nlast line", b"my notes", b"\xff\xd8\xff\xe0 a photo\n\x00\x01",
                                     b'{"image": "a.jpg"}\n'])
def test_an_out_file_that_is_not_a_captions_file_is_refused_untouched(tmp_path, capsys, content):
    """Notes, a photo, a line without a caption: refused before anything is cut or appended."""
    photos(tmp_path / "p", n_per_kind=1)
    out = tmp_path / "notes.txt"
    out.write_bytes(content)
    args = ["caption", str(tmp_path / "p"), "--out", str(out), "--no-progress"]
    assert main(args + ["--alt-text-csv", str(tmp_path / "alt.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "notes.txt" in err and "Traceback" not in err
    assert out.read_bytes() == content and not (tmp_path / "alt.csv").exists()


def test_an_out_path_that_is_a_folder_is_refused(tmp_path, capsys):
    photos(tmp_path / "p", n_per_kind=1)
    (tmp_path / "d").mkdir()
    assert main(["caption", str(tmp_path / "p"), "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "not a file" in capsys.readouterr().err
