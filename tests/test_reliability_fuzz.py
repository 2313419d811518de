"""Property-based tests (hypothesis): the tokenizer, the vocab, the dataset parsers, decoding,
the image loader and every parser of outside input either do what they promise or raise the
one error they document, naming what was wrong; nothing else ever escapes."""
from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from captioner.service.ab import experiment_from_dict, resolve_checkpoint
from captioner.inference.api import Captioner
from captioner.training.config import load_train_config
from captioner.service.config import load_serve_config
from captioner.data.datasets import read_captions_csv, read_split_file, read_token_file
from captioner.inference.decode import SearchConfig, beam_search, sample
from captioner.errors import ConfigError, DataError, ImageError, OptionError
from captioner.data.images import load_image
from captioner.models.model import CaptionModel, ModelConfig
from captioner.data.vocab import SPECIALS, UNK, Vocab, tokenize

from conftest import TINY_MODEL
from corpus import corpus
from reliability import count

pytestmark = pytest.mark.reliability
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
FEW = settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="captioner-fuzz-"))


# --- tokenizer and vocab ----------------------------------------------------------------------

@FUZZ
@given(st.text())
def test_tokenize_gives_lowercase_words_and_is_idempotent(text):
    count("inputs")
    words = tokenize(text)
    assert all(WORD.fullmatch(w) for w in words)
    assert tokenize(" ".join(words)) == words


@FUZZ
@given(captions=st.lists(st.text(max_size=40), max_size=20), min_count=st.integers(1, 3),
       text=st.text(max_size=60), max_len=st.none() | st.integers(0, 10))
def test_vocab_encodes_and_decodes_any_text(captions, min_count, text, max_len):
    count("inputs")
    vocab = Vocab.build(captions, min_count)
    assert tuple(vocab.tokens[:4]) == SPECIALS and len(set(vocab.tokens)) == len(vocab)
    ids = vocab.encode(text, max_len)
    assert ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id and all(0 <= i < len(vocab) for i in ids)
    words = tokenize(text)[:max_len] if max_len is not None else tokenize(text)
    assert vocab.decode(ids) == " ".join(w if w in vocab.tokens else UNK for w in words)
    assert Vocab.from_dict(json.loads(json.dumps(vocab.to_dict()))).tokens == vocab.tokens


@FUZZ
@given(st.lists(st.text(max_size=8), max_size=8))
def test_a_bad_vocab_is_a_value_error(tokens):
    count("inputs")
    try:
        Vocab(tokens)
    except ValueError:
        return
    assert tuple(tokens[:4]) == SPECIALS and len(set(tokens)) == len(tokens)


# --- dataset parsers ----------------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z0-9_]{1,12}\.jpg", fullmatch=True)
captions = st.text(st.characters(blacklist_characters="\r\n\t", blacklist_categories=("Cs",)), min_size=1,
                   max_size=50).filter(lambda c: c.strip())
datasets = st.dictionaries(names, st.lists(captions, min_size=1, max_size=4), min_size=1, max_size=6)


@FUZZ
@given(datasets)
def test_token_and_csv_files_round_trip(data):
    count("inputs")
    folder = scratch()
    token = folder / "Flickr8k.token.txt"
    token.write_text("".join(f"{n}#{i}\t{c}\n" for n, caps in data.items() for i, c in enumerate(caps)),
                     encoding="utf-8")
    with open(folder / "captions.txt", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([n, c] for n, caps in data.items() for c in caps)
    want = {n: [c.strip() for c in caps] for n, caps in data.items()}
    for parsed in (read_token_file(token), read_captions_csv(folder / "captions.txt")):
        assert {n: [c for _, c in caps] for n, caps in parsed.items()} == want


@FUZZ
@given(st.binary(max_size=400) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_dataset_parsers_take_any_bytes_without_crashing(raw):
    count("inputs")
    path = scratch() / "captions.txt"
    path.write_bytes(raw)
    for parse in (read_token_file, read_captions_csv, read_split_file):
        try:
            parse(path)
        except DataError as e:
            assert str(path) in str(e)


CAPTION_FILES = {  # format -> where its captions live in a dataset folder
    "flickr8k": "captions.txt", "flickr30k": "results.csv", "manifest": "manifest.jsonl",
    "coco": "annotations/captions_val2017.json", "karpathy": "dataset_coco.json", "prepared": "dataset.json"}
dataset_keys = st.sampled_from(["images", "annotations", "image", "caption", "captions", "id", "image_id",
                                "file_name", "sentences", "raw", "split", "filename", "filepath", "records"])
json_like = st.recursive(st.none() | st.integers() | st.text(max_size=8),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(dataset_keys, inner, max_size=4),
                         max_leaves=10).map(lambda v: json.dumps(v).encode())
caption_bytes = (st.binary(max_size=300) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))
                 | json_like)


@FUZZ
@given(fmt=st.sampled_from(sorted(CAPTION_FILES)), raw=caption_bytes, strict=st.booleans())
def test_every_dataset_format_takes_any_bytes_without_crashing(fmt, raw, strict):
    """Whatever a dataset's caption file holds, loading it gives a dataset or a DataError
    naming the file; never another exception."""
    from captioner.data.datasets import load_dataset

    count("inputs")
    root = scratch()
    target = root / CAPTION_FILES[fmt]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(raw)
    (root / "Images").mkdir()
    try:
        load_dataset(root, format=fmt, strict=strict)
    except DataError as e:
        assert str(root) in str(e) or "format" in str(e), str(e)


def test_parser_errors_name_the_line(tmp_path):
    bad = tmp_path / "captions.txt"
    bad.write_bytes(b"image,caption\na.jpg,a dog\nb.jpg,\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"captions.txt, line 3: not UTF-8"):
        read_captions_csv(bad)
    bad.write_bytes(b"\xef\xbb\xbfimage,caption\na.jpg,a dog\n")  # a byte-order mark, as Excel writes
    assert read_captions_csv(bad) == {"a.jpg": [(2, "a dog")]}
    bad.write_text('image,caption\na.jpg,"' + "x" * 200_000 + '"\n')
    with pytest.raises(DataError, match=r"captions.txt, line \d+: malformed CSV"):
        read_captions_csv(bad)
    count("inputs", 3)


# --- decoding -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    # The tiny model's ops are too small to split across threads; on a busy machine a second
    # torch thread only waits for a core (one thread makes these tests 50x faster there).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _tiny()
    torch.set_num_threads(threads)


def _tiny() -> CaptionModel:
    torch.manual_seed(0)
    vocab = Vocab.build(["a red square on grass", "a blue circle near two dogs", "people walk"], min_count=1)
    return CaptionModel(ModelConfig.from_dict(TINY_MODEL), vocab).eval()


@FEW
@given(b=st.integers(1, 3), beam=st.integers(1, 4), max_len=st.integers(1, 8), data=st.data(),
       lp=st.floats(0, 2), ngram=st.integers(0, 3), seed=st.integers(0, 2 ** 16))
def test_beam_search_gives_well_formed_ranked_hypotheses(tiny, b, beam, max_len, data, lp, ngram, seed):
    count("inputs")
    n_best = data.draw(st.integers(1, beam))
    feats = torch.randn(b, 49, 1280, generator=torch.Generator().manual_seed(seed))
    v = tiny.vocab
    hyps = beam_search(tiny.decoder, feats, v.bos_id, v.eos_id, v.pad_id,
                       SearchConfig(beam, max_len, lp, n_best, ngram), banned_ids=(v.bos_id, v.unk_id))
    assert hyps.tokens.shape[:2] == (b, n_best) and hyps.tokens.shape[2] <= max_len + 1
    assert torch.isfinite(hyps.scores).all()
    assert (hyps.scores[:, :-1] >= hyps.scores[:, 1:] - 1e-6).all()  # best first
    rows = hyps.tokens.reshape(-1, hyps.tokens.size(-1))  # (B*n, T)
    for row, alphas in zip(rows, hyps.alphas.reshape(-1, *hyps.alphas.shape[2:])):
        ids = row.tolist()
        assert v.eos_id in ids, "every hypothesis ends"
        end = ids.index(v.eos_id)
        assert end <= max_len and all(i == v.pad_id for i in ids[end + 1:])
        words = ids[:end]
        assert not {v.bos_id, v.unk_id, v.pad_id} & set(words)
        if ngram:
            grams = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
            assert len(grams) == len(set(grams)), "no repeated n-gram"
        sums = alphas[:end + 1].sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-4)  # attention maps are distributions
        assert v.decode(ids) == " ".join(v.tokens[i] for i in words)


@FEW
@given(b=st.integers(1, 3), max_len=st.integers(1, 8), seed=st.integers(0, 2 ** 16))
def test_greedy_sampling_equals_beam_one(tiny, b, max_len, seed):
    count("inputs")
    feats = torch.randn(b, 49, 1280, generator=torch.Generator().manual_seed(seed))
    v = tiny.vocab
    greedy = sample(tiny.decoder, feats, v.bos_id, v.eos_id, v.pad_id, max_len=max_len, temperature=0,
                    banned_ids=(v.bos_id, v.unk_id))
    beam = beam_search(tiny.decoder, feats, v.bos_id, v.eos_id, v.pad_id, SearchConfig(1, max_len),
                       banned_ids=(v.bos_id, v.unk_id))
    assert [v.decode(r) for r in greedy.tokens.tolist()] == [v.decode(r[0]) for r in beam.tokens.tolist()]


@FUZZ
@given(beam=st.integers(-3, 100), max_len=st.integers(-3, 500), n_best=st.integers(-1, 100),
       temperature=st.none() | st.floats(allow_nan=True), top_p=st.floats(allow_nan=True))
def test_search_options_are_bounded_with_a_clear_error(tiny, beam, max_len, n_best, temperature, top_p):
    count("inputs")
    captioner = Captioner(tiny)
    try:
        captioner.check_search(beam, max_len, n_best, temperature, top_p)
    except OptionError as e:
        assert re.match(r"(beam_size|max_len|n_best|temperature|top_p) .* is out of range", str(e))
        return
    assert 1 <= beam <= 64 and 1 <= max_len <= 200 and 1 <= n_best and 0 < top_p <= 1


# --- images -------------------------------------------------------------------------------------

GOOD = [s.data for s in corpus() if s.expect == "ok" and len(s.data) < 20_000]


@FUZZ
@given(st.binary(max_size=2048))
def test_the_loader_takes_any_bytes(raw):
    count("inputs")
    try:
        assert load_image(raw, name="x").mode == "RGB"
    except ImageError as e:
        assert str(e).startswith("x: ") and e.kind in ImageError.KINDS


@FUZZ
@given(which=st.integers(0, len(GOOD) - 1), edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                                    st.integers(0, 255)), max_size=6),
       cut=st.none() | st.floats(0, 1))
def test_the_loader_takes_any_damaged_photo(which, edits, cut):
    """Real photos of every format and mode with bytes overwritten and the end cut off."""
    count("inputs")
    data = bytearray(GOOD[which])
    for where, value in edits:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[:int(cut * len(data))]
    try:
        assert load_image(bytes(data), name="x").mode == "RGB"
    except ImageError as e:
        assert str(e).startswith("x: ")


# --- names, configs and bodies from outside -----------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzmodels")
    (root / "models" / "sub").mkdir(parents=True)
    (root / "models" / "ok.pt").write_bytes(b"x")
    (root / "models" / "sub" / "deep.pt").write_bytes(b"x")
    (root / "secret.pt").write_bytes(b"x")
    (root / "models" / "escape.pt").symlink_to(root / "secret.pt")
    return root / "models"


@FUZZ
@given(st.text(max_size=40) | st.sampled_from(["../secret.pt", "escape.pt", "sub/../../secret.pt", "/etc/passwd",
                                               "sub/deep.pt", "ok.pt", "..", ".", "", "ok.pt\0", "~/x"]))
def test_model_names_never_escape_the_model_directory(model_dir, name):
    count("inputs")
    assume(name != "default")
    try:
        path = resolve_checkpoint(model_dir, name)
    except ConfigError:
        return
    assert path.is_relative_to(model_dir.resolve()) and path.is_file()


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
serve_keys = st.sampled_from(["port", "max_batch", "max_pixels", "api_keys", "image_formats", "request_timeout_s",
                              "experiment", "db", "model_dir", "threads", "max_wait_ms", "nonsense"])


@FUZZ
@given(st.dictionaries(serve_keys, json_values, max_size=5))
def test_serve_configs_load_or_name_the_bad_field(fields):
    count("inputs")
    path = scratch() / "serve.json"
    path.write_text(json.dumps(fields))
    try:
        load_serve_config(path)
    except ConfigError as e:
        assert str(path) in str(e) or "experiment" in str(e)


@FUZZ
@given(json_values)
def test_experiment_tables_load_or_name_the_bad_field(raw):
    count("inputs")
    try:
        experiment_from_dict(raw if not isinstance(raw, dict) else {"variants": [raw]})
    except ConfigError as e:
        assert str(e).startswith("experiment")


@FUZZ
@given(st.lists(st.text(max_size=30), max_size=4))
def test_training_overrides_apply_or_name_the_field(overrides):
    count("inputs")
    try:
        load_train_config(None, overrides)
    except ConfigError as e:
        assert "override" in str(e) or "field" in str(e)


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=150).map(lambda b: "data:image/png;base64," + b.hex()))
def test_base64_photos_decode_or_get_422(text):
    pytest.importorskip("fastapi")
    from captioner.service.serve import ApiError, decode_base64

    count("inputs")
    try:
        assert isinstance(decode_base64(text, "images[0]"), bytes)
    except ApiError as e:
        assert e.status == 422 and e.detail.startswith("images[0]")


def test_fuzzing_found_a_photo_of_every_mode():
    assert len(GOOD) >= 20  # the damage test starts from every format and colour mode
    count("inputs")


@pytest.mark.parametrize("text", ["a", "A Dog's ball", "  ", "2 dogs, 3 cats!"])
def test_tokenize_examples(text):
    assert tokenize(text) == {"a": ["a"], "A Dog's ball": ["a", "dog's", "ball"], "  ": [],
                              "2 dogs, 3 cats!": ["2", "dogs", "3", "cats"]}[text]
    count("inputs")


def test_csv_with_quoted_commas(tmp_path):
    f = tmp_path / "c.csv"
    buf = io.StringIO()
    csv.writer(buf).writerows([["image", "caption"], ["a.jpg", "a dog, running"]])
    f.write_text(buf.getvalue())
    assert read_captions_csv(f) == {"a.jpg": [(2, "a dog, running")]}
    count("inputs")
