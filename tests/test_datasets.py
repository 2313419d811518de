"""Every dataset format through the one interface: load_dataset, auto-detection, and bad records
that are named by file and line or record and never move captions onto another photo."""
import json

import pytest

from captioner.data.datasets import detect_format, load_dataset, save_prepared
from captioner.errors import DataError

from builders import captions_for, make_coco, make_flickr30k, make_karpathy, make_manifest
from conftest import make_flickr_like


def by_image(ds):
    return {r.image: r.captions for r in ds.records}


def assert_captions_match_photos(ds):
    """Each photo's captions name its own colour and shape (photos are named <n>_<color><shape>.jpg)."""
    for r in ds.records:
        stem = r.image.rsplit("_", 1)[1][:-4]
        for c in r.captions:
            color, shape = c.lower().replace(".", "").split()[1:3] if not c.startswith("the") else \
                c.split()[3:4] + c.split()[1:2]
            assert stem == f"{color}{shape}", (r.image, c)


@pytest.mark.parametrize("layout", ["csv", "token"])
def test_flickr30k_layouts(tmp_path, layout):
    root, pics = make_flickr30k(tmp_path / "f30k", layout=layout)
    assert detect_format(root)[0] == "flickr30k"
    ds = load_dataset(root)
    assert ds.format == "flickr30k" and ds.name == "flickr30k"
    assert by_image(ds) == dict(pics)
    assert {s: len(ds.split(s)) for s in ("train", "dev", "test")} == {"train": 8, "dev": 2, "test": 2}
    assert any("seeded split" in n for n in ds.notes)


def test_flickr30k_results_csv_quirks(tmp_path):
    root, pics = make_flickr30k(tmp_path / "f30k")
    csv_file = root / "flickr30k_images" / "results.csv"
    lines = csv_file.read_text().splitlines()
    a, b, c = pics[0][0], pics[1][0], pics[2][0]
    lines[1] = f"{a}| 0| A man says \"hi there ."  # a stray quote must not swallow the next lines
    lines[2] = f"{a}| 1| a caption | with a bar"  # the separator inside a caption
    lines[7] = f"{b}| 1   a dog runs across the grass ."  # Kaggle's joined comment number
    lines[12] = f"{c}| 1|   "  # empty caption
    csv_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_dataset(root)
    assert e.value.path == str(csv_file) and e.value.line == 13 and "empty caption" in str(e.value)

    ds = load_dataset(root, strict=False)
    caps = by_image(ds)
    assert caps[a][:2] == ['A man says "hi there .', "a caption | with a bar"] and len(caps[a]) == 5
    assert "a dog runs across the grass ." in caps[b] and len(caps[b]) == 5
    assert len(caps[c]) == 4  # the empty one left out, the rest kept on their own photo
    assert [p.kind for p in ds.problems] == ["empty caption"]
    assert any("split again: line(s) 8" in n for n in ds.notes)
    for name, want in pics[3:]:
        assert caps[name] == want


def test_coco_2014_and_2017(tmp_path):
    for year in (2014, 2017):
        root, made = make_coco(tmp_path / f"coco{year}", year=year)
        assert detect_format(root)[0] == "coco"
        ds = load_dataset(root)
        assert ds.image_dir == root
        train = dict(made["train"][1])
        val = dict(made["val"][1])
        assert {r.image for r in ds.split("train")} == set(train)
        assert {r.image for r in ds.split("dev") + ds.split("test")} == set(val)
        assert len(ds.split("dev")) == len(ds.split("test")) == 6
        assert by_image(ds) == {**train, **val}  # stray newlines stripped
        assert all(ds.image_path(r).is_file() for r in ds.records)
    # one annotation file given directly (a user's own COCO-format set): a seeded split of it
    one = load_dataset(made["val"][0])
    assert set(by_image(one)) == set(val) and one.image_dir == root


def test_coco_bad_records_are_named_and_never_shift(tmp_path):
    root, made = make_coco(tmp_path / "coco")
    path = made["train"][0]
    d = json.loads(path.read_text())
    d["annotations"][3]["image_id"] = 999  # refers to no image
    d["annotations"][7]["caption"] = "  \n"
    del d["annotations"][11]["caption"]
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"captions_train2014.json, annotations\[3\] \(id 4\): image_id 999"):
        load_dataset(root)
    ds = load_dataset(root, strict=False)
    assert sorted(p.kind for p in ds.problems) == ["empty caption", "malformed", "malformed"]
    assert all("captions_train2014.json, annotations[" in p.message for p in ds.problems)
    caps = by_image(ds)
    first, second, third = (made["train"][1][i][0] for i in range(3))
    assert len(caps[first]) == 4 and len(caps[second]) == 4 and len(caps[third]) == 4
    assert_captions_match_photos(ds)


def test_coco_json_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "captions_val2014.json"
    bad.write_text('{"images": [\n{"id": 1,\n "file_name": }]}')
    with pytest.raises(DataError, match=r"captions_val2014.json, line 3: not valid JSON"):
        load_dataset(bad)


@pytest.mark.parametrize("dataset", ["coco", "flickr8k", "flickr30k"])
def test_karpathy_split_files(tmp_path, dataset):
    path, pics = make_karpathy(tmp_path / "k", dataset)
    assert detect_format(path)[0] == "karpathy"
    ds = load_dataset(path)
    assert ds.name == dataset
    prefix = "val2014/" if dataset == "coco" else ""
    assert by_image(ds) == {prefix + n: c for n, c in pics}
    want = {prefix + n: ("train", "train", "dev", "test")[i % 4] for i, (n, _) in enumerate(pics)}
    assert {r.image: r.split for r in ds.records} == want  # restval -> train, val -> dev
    assert all(ds.image_path(r).is_file() for r in ds.records)


def test_karpathy_unknown_split_is_named(tmp_path):
    path, _ = make_karpathy(tmp_path / "k", "flickr8k")
    d = json.loads(path.read_text())
    d["images"][2]["split"] = "holdout"
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"dataset_flickr8k.json, images\[2\]: unknown split 'holdout'"):
        load_dataset(path)


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_with_and_without_split(tmp_path, kind):
    path, pics = make_manifest(tmp_path / kind, kind)
    assert detect_format(path)[0] == "manifest" and detect_format(path.parent)[0] == "manifest"
    ds = load_dataset(path)
    assert by_image(ds) == {n: c for n, c, _ in pics}
    assert {r.image: r.split for r in ds.records} == {n: s for n, _, s in pics}
    assert ds.image_dir == path.parent

    path, pics = make_manifest(tmp_path / f"{kind}-nosplit", kind, with_split=False)
    a, b = load_dataset(path, seed=1), load_dataset(path, seed=1)
    assert [(r.image, r.split) for r in a.records] == [(r.image, r.split) for r in b.records]
    assert all(a.split(s) for s in ("train", "dev", "test"))
    assert any("seeded split" in n for n in a.notes)
    assert [(r.image, r.split) for r in load_dataset(path, seed=2).records] != [(r.image, r.split) for r in a.records]


def test_manifest_bad_rows_are_named_and_never_shift(tmp_path):
    path, pics = make_manifest(tmp_path / "m", "csv")
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"a ', '"a, ')  # quoted comma: fine
    lines[2] = "photos/" + pics[0][0].split("/")[1] + ",a red square, unquoted,train"  # 4 fields
    lines[6] = '../outside.jpg,"escapes the root",train'
    lines[8] = f'{pics[1][0]},"an unbalanced quote,train'  # swallows the lines after it
    lines.insert(12, f'{pics[2][0]},"a {pics[2][0]} caption",test')  # conflicts with its train rows
    path.write_text("\n".join(lines) + "\n")
    ds = load_dataset(path, strict=False)
    kinds = sorted(p.kind for p in ds.problems)
    assert kinds == ["malformed", "malformed", "malformed", "split conflict"], ds.problems
    messages = " | ".join(p.message for p in ds.problems)
    assert "manifest.csv, line 3: expected 3 fields" in messages
    assert "manifest.csv, line 7: image path '../outside.jpg'" in messages
    assert "manifest.csv, line 9: row spans lines 9-" in messages
    caps = by_image(ds)
    assert pics[2][0] not in caps  # its split is ambiguous: left out whole
    assert len(caps[pics[0][0]]) == 4 and caps[pics[0][0]][0] == "a, red square ."
    assert_captions_match_photos(ds)
    with pytest.raises(DataError, match="manifest.csv, line 3"):
        load_dataset(path)


def test_manifest_jsonl_errors_and_paths(tmp_path):
    path, pics = make_manifest(tmp_path / "j", "jsonl")
    lines = path.read_text().splitlines()
    lines[0] = lines[0][:-5]  # cut
    lines[3] = json.dumps({"image": pics[3][0], "caption": 7})
    path.write_text("\n".join(lines) + "\n")
    ds = load_dataset(path, strict=False)
    assert [p.message.split(": ", 1)[0] for p in ds.problems] == [f"{path}, line 1", f"{path}, line 4"]
    assert pics[0][0] not in by_image(ds) and by_image(ds)[pics[1][0]] == pics[1][1]


def test_image_root_and_missing_photos(tmp_path):
    path, pics = make_manifest(tmp_path / "m", "jsonl")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (path.parent / "photos").rename(moved / "photos")
    with pytest.raises(DataError, match=r"manifest.jsonl, line 1: image photos/\S+ not found"):
        load_dataset(path)
    ds = load_dataset(path, image_root=str(moved))
    assert len(ds.records) == len(pics) and ds.image_dir == moved


def test_prepared_round_trip_and_identical_flickr8k_layouts(tmp_path):
    token = load_dataset(make_flickr_like(tmp_path / "a", layout="token"))
    csv_ = load_dataset(make_flickr_like(tmp_path / "b", layout="csv"), image_root=str(tmp_path / "a" / "Images"))
    save_prepared(token, tmp_path / "p1")
    save_prepared(csv_, tmp_path / "p2")
    assert (tmp_path / "p1" / "dataset.json").read_bytes() == (tmp_path / "p2" / "dataset.json").read_bytes()
    back = load_dataset(tmp_path / "p1")
    assert back.format == "prepared" and back.name == "flickr8k"
    assert [(r.image, r.captions, r.split) for r in back.records] == \
        [(r.image, r.captions, r.split) for r in token.records]


def test_unknown_folder_and_format_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no known dataset layout"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="unknown dataset format 'imagenet'"):
        load_dataset(tmp_path / "empty", "imagenet")
    assert captions_for("red", "circle")[0] == "a red circle ."


def _tampered(tmp_path, change):
    save_prepared(load_dataset(make_flickr_like(tmp_path / "a", layout="token")), tmp_path / "p")
    file = tmp_path / "p" / "dataset.json"
    d = json.loads(file.read_text())
    change(d)
    file.write_text(json.dumps(d))
    return tmp_path / "p"


@pytest.mark.parametrize("change, says", [
    (lambda d: d.pop("image_dir"), "field image_dir"),
    (lambda d: d.update(image_dir=5), "field image_dir"),
    (lambda d: d.update(records=5), "field records"),
    (lambda d: d["records"][0].update(image="/etc/hostname"), "is absolute or climbs out"),
    (lambda d: d["records"][0].update(image="../Images/x.jpg"), "is absolute or climbs out"),
    (lambda d: d["records"].append({**d["records"][0], "split": "test"}), "is listed twice"),
])
def test_a_tampered_prepared_dataset_is_refused_by_field(tmp_path, change, says):
    with pytest.raises(DataError, match=says):
        load_dataset(_tampered(tmp_path, change))


def test_flickr_photo_paths_stay_in_the_image_folder_and_split_conflicts_are_named(tmp_path):
    root = make_flickr_like(tmp_path / "a", layout="token")
    token = next(root.rglob("Flickr8k.token.txt"))
    token.write_text(token.read_text() + "/etc/hostname#0\thello there\n")
    with pytest.raises(DataError, match=r"'/etc/hostname' is absolute or climbs out"):
        load_dataset(root)
    root = make_flickr_like(tmp_path / "b", layout="token")
    train, test = next(root.rglob("Flickr_8k.trainImages.txt")), next(root.rglob("Flickr_8k.testImages.txt"))
    test.write_text(test.read_text() + train.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match="listed in the train and the test split files"):
        load_dataset(root)


@pytest.mark.parametrize("text, says", [("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                                        ('{"images": [{"id": ' + "9" * 5000 + "}]}", "digits")])
def test_json_a_parser_chokes_on_is_a_data_error(tmp_path, text, says):
    coco = tmp_path / "captions_train2017.json"
    coco.write_text(text)
    with pytest.raises(DataError, match=says):
        load_dataset(coco, "coco")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(text + "\n")
    with pytest.raises(DataError, match=says):
        load_dataset(manifest, "manifest")
