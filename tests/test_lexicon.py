"""The packaged ImageNet lexicon covers all 1,000 classes consistently (port of the reviewer's
check_lexicon.py; the Flickr8k proxy check skips without the data)."""
from __future__ import annotations

import re
from collections import Counter, defaultdict

import pytest

from captioner.models.lexicon import load_lexicon
from conftest import FLICKR8K

CATEGORIES = {
    "animal", "dog", "cat", "bird", "fish", "insect", "reptile", "food", "drink", "vehicle",
    "aircraft", "watercraft", "furniture", "kitchenware", "clothing", "instrument", "sports",
    "electronics", "tool", "weapon", "toy", "building", "structure", "landscape", "plant",
    "person", "container", "household", "other",
}
# the first letter does not give the sound: "a unicycle", "an hourglass"
ARTICLE_EXCEPTIONS = {
    "unicycle": "a", "uniform": "a", "ukulele": "a", "unicorn": "a", "university": "a",
    "utensil": "a", "european": "a", "one-way": "a", "ewe": "a",
    "hourglass": "an", "hour": "an", "honest": "an", "heir": "an",
}
INVARIANT_PLURALS = {"fish", "goldfish", "clownfish", "pufferfish", "starfish", "jellyfish", "crayfish",
                     "sheep", "bison", "buffalo", "quail", "mink", "zucchini", "deer"}
PLURAL_SPOT = {"mouse": "mice", "bus": "buses", "fish": "fish", "goose": "geese", "sheep": "sheep",
               "knife": "knives", "wolf": "wolves", "dress": "dresses", "scarf": "scarves",
               "fungus": "fungi", "volcano": "volcanoes", "hippo": "hippos", "strawberry": "strawberries",
               "bookshelf": "bookshelves", "wine glass": "wine glasses",
               "mortar and pestle": "mortars and pestles", "compass": "compasses",
               "broccoli": "broccoli", "espresso": "espressos", "daisy": "daisies", "tomato": "tomatoes"}
# class labels of the classifier's output order (anchors checked against the stock Lite0 head)
ANCHORS = {0: "tench", 1: "goldfish", 281: "tabby", 285: "Egyptian cat", 340: "zebra", 657: "missile",
           752: "racket", 760: "refrigerator", 812: "space shuttle", 937: "broccoli", 967: "espresso",
           999: "toilet tissue"}
SPOT_WORDS = {967: ("espresso", "coffee"), 340: ("zebra", "horse"), 752: ("tennis racket", None),
              145: ("penguin", None), 657: ("rocket", None), 744: ("rocket", None), 291: ("lion", None),
              555: ("fire truck", None), 934: ("hot dog", None), 937: ("broccoli", None),
              504: ("mug", None), 968: ("cup", None)}
WORD_RE = re.compile(r"^[a-z][a-z0-9' -]*[a-z0-9]$|^[a-z]$")
LEX = load_lexicon()


def test_thousand_classes_in_order_with_anchor_labels():
    assert [e.index for e in LEX] == list(range(1000))
    for i, label in ANCHORS.items():
        assert LEX[i].imagenet == label


@pytest.mark.parametrize("e", LEX, ids=lambda e: f"{e.index}-{e.imagenet}")
def test_entry_is_well_formed(e):
    assert e.category in CATEGORIES
    assert e.article in ("a", "an", "")
    if e.word is None:
        assert e.plural is None and e.article == "" and e.proxy is None
        return
    for s in (e.word, e.plural):
        assert WORD_RE.match(s) and s == s.lower().strip()
    assert not re.match(r"^(a|an|the) ", e.word)
    assert re.match(r"^[a-z]+$", e.proxy)
    assert e.tokens, "the word must tokenise to at least one vocab token"
    if e.article == "":  # mass or plural-only noun
        assert e.plural == e.word
        return
    first = e.word.split()[0]
    expected = ARTICLE_EXCEPTIONS.get(first, "an" if e.word[0] in "aeiou" else "a")
    assert e.article == expected
    if e.plural == e.word:
        assert e.word.split()[-1] in INVARIANT_PLURALS
    if e.word in PLURAL_SPOT:
        assert e.plural == PLURAL_SPOT[e.word]


def test_one_plural_and_article_per_word():
    by_word = defaultdict(set)
    for e in LEX:
        if e.word is not None:
            by_word[e.word].add((e.plural, e.article))
    assert {w: v for w, v in by_word.items() if len(v) > 1} == {}


def test_mandated_mappings():
    for i in range(151, 269):
        assert (LEX[i].word, LEX[i].category) == ("dog", "dog"), LEX[i]
    for i in range(281, 286):
        assert (LEX[i].word, LEX[i].category) == ("cat", "cat"), LEX[i]
    for i, (word, proxy) in SPOT_WORDS.items():
        assert LEX[i].word == word and (proxy is None or LEX[i].proxy == proxy), LEX[i]
    for i, art in {967: "an", 879: "an", 950: "an", 404: "an", 880: "a", 652: "a", 604: "an"}.items():
        assert LEX[i].article == art
    assert sum(e.word is None for e in LEX) == 2  # velvet, web site


def test_proxies_are_words_of_the_shipped_vocab():
    from captioner.models.checkpoint import load_checkpoint, resolve_checkpoint

    vocab = set(load_checkpoint(resolve_checkpoint(None))[0].vocab.tokens)
    missing = sorted({e.proxy for e in LEX if e.proxy is not None} - vocab)
    assert missing == []


def test_proxies_are_flickr8k_train_words():
    tokens = FLICKR8K / "Flickr8k_text" / "Flickr8k.token.txt"
    train = FLICKR8K / "Flickr8k_text" / "Flickr_8k.trainImages.txt"
    if not (tokens.exists() and train.exists()):
        pytest.skip("Flickr8k captions not found")
    from captioner.data.vocab import tokenize

    names = set(train.read_text().split())
    counts: Counter[str] = Counter()
    for line in tokens.read_text().splitlines():
        key, text = line.split("\t", 1)
        if key.split("#")[0] in names:
            counts.update(tokenize(text))
    vocab = {w for w, n in counts.items() if n >= 5}
    for e in LEX:
        if e.word is not None:
            assert e.proxy in vocab, e
            assert e.word not in vocab or e.proxy == e.word, e
