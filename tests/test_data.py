import pytest

from captioner.data.datasets import load_flickr8k, read_captions_csv, read_token_file, seeded_split
from captioner.errors import DataError

from conftest import FLICKR8K, make_flickr_like, needs_flickr8k


def test_token_layout_with_official_split(tiny_data):
    ds = load_flickr8k(tiny_data)
    assert len(ds.records) == 24
    assert {s: len(ds.split(s)) for s in ("train", "dev", "test")} == {"train": 12, "dev": 6, "test": 6}
    assert all(len(r.captions) == 5 for r in ds.records)
    assert ds.image_path(ds.records[0]).is_file()


def test_both_layouts_give_identical_records(tmp_path):
    a = load_flickr8k(make_flickr_like(tmp_path / "a", layout="token"))
    b = load_flickr8k(make_flickr_like(tmp_path / "b", layout="csv"))
    assert [(r.image, r.captions, r.split) for r in a.records] == [(r.image, r.captions, r.split) for r in b.records]


def test_jpg1_quirk_maps_to_the_same_photo(tmp_path):
    f = tmp_path / "Flickr8k.token.txt"
    f.write_text("p.jpg#0\tone\np.jpg.1#0\ttwo\np.jpg.1#1\tthree\n")
    assert [c for _, c in read_token_file(f)["p.jpg"]] == ["one", "two", "three"]


@pytest.mark.parametrize("line, message", [
    ("no tab here", "line 2"),
    ("p.jpg#1\t   ", "empty caption"),
    ("#1\tcaption", "line 2"),
])
def test_token_file_errors_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "Flickr8k.token.txt"
    f.write_text(f"p.jpg#0\tfine\n{line}\n")
    with pytest.raises(DataError) as e:
        read_token_file(f)
    assert str(f) in str(e.value) and message in str(e.value)
    assert e.value.line == 2


def test_csv_errors_name_file_and_line(tmp_path):
    f = tmp_path / "captions.txt"
    f.write_text("image,caption\np.jpg,fine\nq.jpg,\n")
    with pytest.raises(DataError, match=r"captions.txt, line 3: empty caption for q.jpg"):
        read_captions_csv(f)
    f.write_text("img,text\n")
    with pytest.raises(DataError, match="header"):
        read_captions_csv(f)


def test_csv_caption_with_commas_is_kept_whole(tmp_path):
    f = tmp_path / "captions.txt"
    f.write_text('image,caption\np.jpg,"a dog, a cat"\np.jpg,a man, a hat\n')
    assert [c for _, c in read_captions_csv(f)["p.jpg"]] == ["a dog, a cat", "a man, a hat"]


def test_missing_image_names_caption_file_and_line(tiny_data):
    victim = sorted((tiny_data / "Images").iterdir())[5]
    victim.unlink()
    with pytest.raises(DataError) as e:
        load_flickr8k(tiny_data)
    assert victim.name in str(e.value) and "Flickr8k.token.txt" in str(e.value) and e.value.line is not None


def test_split_file_naming_an_uncaptioned_image_is_an_error(tiny_data):
    (tiny_data / "Flickr8k_text" / "Flickr_8k.testImages.txt").write_text("ghost.jpg\n")
    with pytest.raises(DataError, match="ghost.jpg"):
        load_flickr8k(tiny_data)


def test_seeded_split_without_split_files_is_deterministic(tmp_path):
    root = make_flickr_like(tmp_path / "d", with_splits=False)
    a, b = load_flickr8k(root, seed=3), load_flickr8k(root, seed=3)
    assert [(r.image, r.split) for r in a.records] == [(r.image, r.split) for r in b.records]
    assert any("seeded split" in n for n in a.notes)
    assert all(a.split(s) for s in ("train", "dev", "test"))
    names = [f"{i}.jpg" for i in range(100)]
    assert seeded_split(names, seed=1) != seeded_split(names, seed=2)
    assert sorted(seeded_split(names).values()).count("test") == 12


@needs_flickr8k()
@pytest.mark.flickr8k
def test_real_flickr8k_both_layouts_agree():
    token = load_flickr8k(FLICKR8K, layout="token")
    csv = load_flickr8k(FLICKR8K, layout="csv")
    assert {s: len(token.split(s)) for s in ("train", "dev", "test")} == {"train": 6000, "dev": 1000, "test": 1000}
    assert [(r.image, r.captions, r.split) for r in token.records] == \
        [(r.image, r.captions, r.split) for r in csv.records]
    assert all(len(r.captions) == 5 for r in token.records)
