from hypothesis import given, strategies as st

from captioner.data.vocab import SPECIALS, Vocab, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A dog, running -- through the SNOW!") == ["a", "dog", "running", "through", "the", "snow"]
    assert tokenize("a man's hat .") == ["a", "man's", "hat"]


def test_build_keeps_frequent_words_and_specials_first():
    v = Vocab.build(["a dog", "a dog runs", "a cat"], min_count=2)
    assert v.tokens[:4] == list(SPECIALS)
    assert v.tokens[4:] == ["a", "dog"]


def test_encode_decode_roundtrip_uses_vocab_ids():
    v = Vocab.build(["a dog runs"] * 3, min_count=1)
    ids = v.encode("A dog flies")
    assert ids[0] == v.bos_id and ids[-1] == v.eos_id
    assert v.unk_id in ids
    assert v.decode(v.encode("a dog runs")) == "a dog runs"
    # decoding stops at EOS and drops PAD/BOS
    assert v.decode([v.bos_id, v.tokens.index("dog"), v.eos_id, v.tokens.index("runs")]) == "dog"


def test_encode_truncates_to_max_len():
    v = Vocab.build(["a b c d e"] * 2, min_count=1)
    assert len(v.encode("a b c d e", max_len=2)) == 4


def test_dict_roundtrip():
    v = Vocab.build(["x y z"], min_count=1)
    assert Vocab.from_dict(v.to_dict()).tokens == v.tokens


@given(st.text(max_size=80))
def test_tokenize_never_yields_empty_or_punctuation(text):
    for w in tokenize(text):
        assert w and w == w.lower() and w[0].isalnum()


@given(st.lists(st.text(alphabet="abc ,.", max_size=20), max_size=20))
def test_decode_of_encode_only_has_known_words(caps):
    v = Vocab.build(caps, min_count=1)
    for c in caps:
        for w in v.decode(v.encode(c)).split():
            assert w in v.tokens
