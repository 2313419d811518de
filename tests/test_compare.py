"""captioner compare: a paired bootstrap over photos of two evaluate captions files."""
import json
import random

import numpy as np
import pytest

from captioner.cli import main
from captioner.evaluation.compare import BOOTSTRAP_METRICS, compare_files, corpus_scores, paired_bootstrap, photo_stats
from captioner.evaluation.metrics import score_captions

SUBJECTS = ["a dog", "two children", "a man", "a woman", "a brown dog", "three people", "a girl", "a boy"]
ACTIONS = ["runs", "plays", "jumps", "sits", "walks", "swims", "climbs", "rides a bike"]
PLACES = ["in the snow", "on the beach", "in the park", "on the grass", "in the water", "on a rock"]


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)} ."


def _split(n: int = 40, seed: int = 0) -> tuple[dict[str, list[str]], dict[str, str], dict[str, str]]:
    """References, a weak model's captions (random sentences) and a strong one's (near a reference)."""
    rng = random.Random(seed)
    refs = {f"{i:03d}.jpg": [_sentence(rng) for _ in range(5)] for i in range(n)}
    weak = {k: _sentence(rng) for k in refs}
    strong = {k: v[0].replace(" .", "") for k, v in refs.items()}
    return refs, weak, strong


def _write(path, refs, caps):
    path.write_text(json.dumps([{"image": k, "caption": caps[k], "references": refs[k]} for k in refs]))
    return path


def test_whole_split_scores_are_the_toolkits():
    refs, weak, _ = _split()
    [stats] = photo_stats([weak], refs)
    scores = corpus_scores(stats, np.arange(len(refs))[None, :])
    toolkit, _ = score_captions(weak, refs, BOOTSTRAP_METRICS)
    for m in BOOTSTRAP_METRICS:
        assert scores[m][0] == pytest.approx(toolkit[m], abs=1e-9), m


def test_a_drawn_set_is_scored_as_the_toolkit_scores_those_photos():
    # a draw with repeats is the corpus of those photos, each counted as often as drawn
    # (CIDEr-D aside: its document frequencies stay the whole split's, as the module says)
    refs, weak, _ = _split()
    images = sorted(refs)
    [stats] = photo_stats([weak], refs)
    draw = np.array([[0, 0, 3, 5, 5, 5, 9]])
    scores = corpus_scores(stats, draw)
    drawn = {f"{j}-{images[i]}": i for j, i in enumerate(draw[0])}
    toolkit, _ = score_captions({k: weak[images[i]] for k, i in drawn.items()},
                                {k: refs[images[i]] for k, i in drawn.items()}, ("Bleu_1", "Bleu_4", "ROUGE_L"))
    for m in toolkit:
        assert scores[m][0] == pytest.approx(toolkit[m], abs=1e-9), m


def test_the_same_captions_differ_by_nothing():
    refs, weak, _ = _split()
    a, b = photo_stats([weak, dict(weak)], refs)
    for m in paired_bootstrap(a, b, resamples=200):
        assert m.a == m.b and m.diff_interval == (0.0, 0.0) and m.b_better == 0.0
        assert m.a_interval[0] <= m.a <= m.a_interval[1] and m.a_interval[0] < m.a_interval[1]


def test_a_clearly_better_set_wins_in_every_draw():
    refs, weak, strong = _split()
    a, b = photo_stats([weak, strong], refs)
    result = {m.metric: m for m in paired_bootstrap(a, b, resamples=300)}
    for m in ("Bleu_4", "CIDEr", "ROUGE_L"):
        assert result[m].diff_interval[0] > 0 and result[m].b_better == 1.0, m
    # swapped, the intervals mirror
    back = {m.metric: m for m in paired_bootstrap(b, a, resamples=300)}
    assert back["CIDEr"].diff_interval == pytest.approx((-result["CIDEr"].diff_interval[1],
                                                        -result["CIDEr"].diff_interval[0]))


def test_the_draws_follow_the_seed():
    refs, weak, strong = _split()
    a, b = photo_stats([weak, strong], refs)
    one, again, other = (paired_bootstrap(a, b, resamples=200, seed=s) for s in (1, 1, 2))
    assert [m.diff_interval for m in one] == [m.diff_interval for m in again]
    assert [m.diff_interval for m in one] != [m.diff_interval for m in other]


def test_cli_prints_the_table_and_json(tmp_path, capsys):
    refs, weak, strong = _split()
    a, b = _write(tmp_path / "a.json", refs, weak), _write(tmp_path / "b.json", refs, strong)
    assert main(["compare", str(a), str(b), "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "40 photos" in out and "200 draws" in out and "CIDEr" in out and "100% of draws" in out
    assert main(["compare", str(a), str(b), "--resamples", "200", "--json"]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["photos"] == 40 and [m["metric"] for m in d["metrics"]] == list(BOOTSTRAP_METRICS)
    assert all(m["b"] > m["a"] for m in d["metrics"])


@pytest.mark.parametrize("rows, message", [
    ("not json", "not a JSON captions file"),
    ([], "non-empty JSON list"),
    ([{"image": "x.jpg", "references": ["a dog"]}], "entry 0 (x.jpg): 'caption' must be a string"),
    ([{"caption": "a dog", "references": ["a dog"]}], "entry 0: 'image' must be a non-empty string"),
    ([{"image": "x.jpg", "caption": "a dog", "references": []}], "entry 0 (x.jpg): 'references' must be"),
    ([{"image": "x.jpg", "caption": "a", "references": ["a"]}, {"image": "x.jpg", "caption": "b", "references": ["b"]}],
     "entry 1 (x.jpg): the photo appears twice"),
])
def test_a_bad_file_is_named_with_its_entry(tmp_path, capsys, rows, message):
    refs, weak, _ = _split(n=5)
    good = _write(tmp_path / "good.json", refs, weak)
    bad = tmp_path / "bad.json"
    bad.write_text(rows if isinstance(rows, str) else json.dumps(rows))
    assert main(["compare", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}" in err and message in err


def test_files_of_different_photos_or_references_are_refused(tmp_path):
    from captioner.errors import DataError

    refs, weak, strong = _split(n=6)
    a = _write(tmp_path / "a.json", refs, weak)
    fewer = {k: v for k, v in list(refs.items())[:5]}
    with pytest.raises(DataError, match=r"1 photo\(s\) only in .*a.json, e.g. 005.jpg"):
        compare_files(a, _write(tmp_path / "b.json", fewer, strong))
    other = {k: (["a cat sleeps ."] * 5 if k == "002.jpg" else v) for k, v in refs.items()}
    with pytest.raises(DataError, match="references for 002.jpg differ"):
        compare_files(a, _write(tmp_path / "c.json", other, strong))
    with pytest.raises(DataError, match="captions file not found"):
        compare_files(a, tmp_path / "missing.json")


def test_too_few_draws_or_a_bad_level_are_refused(tmp_path, capsys):
    refs, weak, _ = _split(n=5)
    a = _write(tmp_path / "a.json", refs, weak)
    assert main(["compare", str(a), str(a), "--resamples", "10"]) == 2
    assert "--resamples must be at least 100" in capsys.readouterr().err
    assert main(["compare", str(a), str(a), "--confidence", "95"]) == 2
    assert "--confidence must be in [0.5, 1)" in capsys.readouterr().err
    for resamples in ("1000000000", "100001"):  # a cap: memory and time would grow without bound
        assert main(["compare", str(a), str(a), "--resamples", resamples]) == 2
        assert f"at most 100000 (more only take time), not {resamples}" in capsys.readouterr().err
    assert main(["compare", str(a), str(a), "--seed", "-1"]) == 2
    assert "--seed must be 0 or more, not -1" in capsys.readouterr().err


def test_draws_scored_in_chunks_are_the_draws_of_one_call(monkeypatch):
    """Many draws are scored a chunk at a time (bounded memory), from one stream of the seed:
    the intervals are those of drawing them all at once."""
    from captioner.evaluation import compare

    refs, weak, strong = _split()
    a, b = photo_stats([weak, strong], refs)
    whole = paired_bootstrap(a, b, resamples=301, seed=4)
    monkeypatch.setattr(compare, "_CHUNK_CELLS", 7 * len(refs))  # chunks of 7 draws, the last one short
    chunked = paired_bootstrap(a, b, resamples=301, seed=4)
    flat = lambda ms: [x for m in ms for x in (m.a, m.b, *m.a_interval, *m.b_interval, *m.diff_interval,  # noqa: E731
                                               m.b_better)]
    assert flat(chunked) == pytest.approx(flat(whole), abs=1e-12)  # a matrix product's rounding aside
