"""Photos as users send them, through every door: the shared loader, the CLI and the server.

Each file of the generated corpus (tests/corpus.py) gets a correct picture (rotation applied,
alpha flattened, 16-bit scaled) or a clear error naming it: an exit code and a message in the
CLI, with the other photos still captioned; a 4xx JSON body from the API. Never a crash or a
hang.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from captioner.cli import main
from captioner.errors import ImageError
from captioner.data.images import ImageLimits, load_image

from corpus import ANY_ERROR, ANYTHING, CAT, Sample, write_corpus
from reliability import count

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> tuple[Path, list[Sample]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_corpus(folder)


def judge(sample: Sample, load) -> str:
    """Run `load`; return "" if it did what the sample expects, else what went wrong."""
    count("inputs")
    try:
        img = load()
    except ImageError as e:
        if sample.name not in str(e):
            return f"error does not name the file: {e}"
        if sample.expect in ("ok",):
            return f"expected a picture, got {e.kind}: {e}"
        if sample.expect not in (ANY_ERROR, ANYTHING) and e.kind != sample.expect:
            return f"expected {sample.expect}, got {e.kind}: {e}"
        return ""
    except Exception as e:  # anything else escaping the loader is a crash
        return f"crash: {type(e).__name__}: {e}"
    if sample.expect not in ("ok", ANYTHING):
        return f"expected {sample.expect}, got a {img.size} picture"
    if img.mode != "RGB":
        return f"mode {img.mode}, not RGB"
    if sample.check is not None:
        try:
            sample.check(img)
        except AssertionError as e:
            return f"wrong picture: {e}"
    return ""


def test_loader_gives_the_right_picture_or_names_the_problem(corpus_dir):
    folder, samples = corpus_dir
    problems = {}
    for s in samples:
        for how, load in (("bytes", lambda: load_image(s.data, name=s.name)),
                          ("path", lambda: load_image(folder / s.name))):
            why = judge(s, load)
            if why:
                problems[f"{s.name} ({how})"] = why
    count("failures", len(problems))
    assert not problems, problems


def test_callers_limits_refuse_by_header_and_format(corpus_dir):
    folder, _ = corpus_dir
    with pytest.raises(ImageError, match=r"huge.jpg: too many pixels: 4000x3000") as e:
        load_image(folder / "huge.jpg", ImageLimits(max_pixels=1_000_000))
    assert e.value.kind == "too_many_pixels"
    with pytest.raises(ImageError, match=r"photo.tiff: TIFF images are not accepted here; send one of JPEG, PNG"):
        load_image(folder / "photo.tiff", ImageLimits(formats=("JPEG", "PNG")))
    assert load_image(folder / "photo.png", ImageLimits(formats=("JPEG", "PNG"))).size == (64, 32)
    count("inputs", 3)


def test_paths_that_are_not_photos_never_hang(tmp_path):
    """A FIFO would block a reader for ever and /dev/zero never ends: both are refused
    before a byte is read, as are folders and missing files."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.jpg"
    zero.symlink_to("/dev/zero")
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    cases = {fifo: "not_a_file", zero: "not_a_file", folder: "not_a_file", tmp_path / "missing.jpg": "not_found"}
    results: dict[Path, str] = {}

    def run() -> None:
        for path in cases:
            try:
                load_image(path)
                results[path] = "loaded"
            except ImageError as e:
                results[path] = e.kind if path.name in str(e) else f"unnamed: {e}"

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), f"hung; finished {results}"
    assert results == cases
    count("inputs", len(cases))


# Every bad file, and a few good ones of different kinds (the loader test checks every good one's
# pixels; encoding all of them again here would only cost time).
CLI_GOOD = {"photo.tiff", "cmyk.jpg", "grey16.png", "exif-6.jpg", "animated.gif", "one-pixel.png", "huge.jpg"}


def test_cli_captions_the_good_photos_and_names_each_bad_one(corpus_dir, tmp_path, capsys):
    all_samples = corpus_dir[1]
    samples = [s for s in all_samples if s.expect != "ok" or s.name in CLI_GOOD]
    folder = tmp_path / "photos"
    folder.mkdir()
    for s in samples:
        (folder / s.name).write_bytes(s.data)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    extra = [fifo, tmp_path / "missing.jpg"]  # (a folder is captioned as the photos in it)
    code = main(["caption", str(folder), *map(str, extra), "--json", "--beam-size", "1", "--max-len", "8"])
    out, err = capsys.readouterr()
    captioned = {Path(json.loads(line)["image"]).name: json.loads(line) for line in out.splitlines()}
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    count("inputs", len(samples) + len(extra))
    assert code == 1  # some photos failed
    for s in samples:
        named = [e for e in errors if f"{folder / s.name}:" in e]
        if s.expect == "ok":
            assert s.name in captioned and not named, (s.name, named)
            assert captioned[s.name]["caption"].strip(), s.name
        elif s.expect == ANYTHING:
            assert (s.name in captioned) != bool(named), s.name
        else:
            assert s.name not in captioned and len(named) == 1, (s.name, named)
    for path in extra:
        assert sum(f"{path}:" in e for e in errors) == 1, path
    assert len(captioned) + len(errors) == len(samples) + len(extra)  # every photo answered once


def test_cli_refuses_out_of_range_options_before_reading_photos(capsys, tmp_path):
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(CAT)
    for args, word in ((["--max-len", "100000"], "max_len"), (["--beam-size", "0"], "beam_size"),
                       (["--n-best", "5"], "n_best"), (["--temperature", "-1"], "temperature")):
        assert main(["caption", str(photo), *args]) == 2
        assert word in capsys.readouterr().err
        count("inputs")
