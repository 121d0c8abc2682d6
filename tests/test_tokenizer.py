"""WorldTokenizer against the official `rwkv` TRIE_TOKENIZER (the reference), plus its API."""

from __future__ import annotations

import pickle
import random
import shutil

import numpy as np
import pytest

from rwkv_ray.tokenizer import (
    DEFAULT_VOCAB_PATH,
    PAD_ID,
    VOCAB_SIZE,
    WorldTokenizer,
    compile_trie_regex,
    load_vocab,
)

rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")

EIFFEL = "The Eiffel tower is in the city of"
EIFFEL_IDS = [6699, 304, 25740, 109, 39990, 4600, 4596, 22590, 30449, 4706]

CORPUS = [
    EIFFEL,
    "Hello, world! It's 2024-06-01; e-mail: a.b@c.org (x+y)*z^2 = 42 % 7 & ~0 | 1 #tag",
    "我爱北京天安门。机器学习是人工智能的一个分支，深度学习又是机器学习的一个子领域。",
    "日本語のテキスト：東京タワーは港区にあります。カタカナとひらがな、漢字を含みます。",
    "한국어 문장입니다. 서울은 대한민국의 수도입니다.",
    "اللغة العربية تكتب من اليمين إلى اليسار. مرحبا بالعالم!",
    "Русский текст: Москва — столица России. Ёлка, щи, съезд.",
    "हिन्दी भारत की एक भाषा है। नमस्ते दुनिया!",
    "Emoji: 😀😃😄 👍🏽👍🏿 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 🇫🇷🇯🇵 1️⃣ 🧑🏾‍💻",
    "def f(x):\n\tif x > 0:\n\t\treturn x * 2  # double\n    else:\n        return {'a': [1, 2]}\n",
    'int main(void) {\n    printf("%d\\n", 42);\n    return 0;\n}\n',
    "   leading spaces, trailing spaces   \t\t tabs \t and\u00a0nbsp\u3000ideographic space",
    "paragraph one\n\nparagraph two\n\n\n\nthree\r\nwindows\r\n\r\nline",
    " " * 200 + "x" + "\n" * 7 + "#" * 100 + "-" * 90 + "=" * 33,
    "Mixed: naïve café Ωmega ß ﬁ ℕ ∑∫√ ≤≥ ½ ¾ \u200b zero-width \u200d joiner \ufeff bom",
    "\x00\x01\x7f control chars \x1b[31m red \x1b[0m",
    "",
    "a",
    "\n\n",
]


@pytest.fixture(scope="module")
def tok() -> WorldTokenizer:
    return WorldTokenizer()


@pytest.fixture(scope="module")
def official():
    return rwkv_tokenizer.TRIE_TOKENIZER(str(DEFAULT_VOCAB_PATH))


def _random_text(rng: random.Random, n: int) -> str:
    # Mostly plausible characters, some anywhere in Unicode (minus surrogates).
    ranges = [(0x20, 0x7E), (0x0A, 0x0A), (0xA0, 0x24F), (0x400, 0x4FF), (0x4E00, 0x9FFF)]
    ranges += [(0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0xE000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        c = rng.randint(lo, hi)
        out.append(chr(c))
    return "".join(out)


# ---- the vocab --------------------------------------------------------------------------


def test_vocab_file_and_constants(tok):
    vocab = load_vocab(DEFAULT_VOCAB_PATH)
    assert len(vocab) == 65529 == len(tok)
    assert sorted(vocab) == list(range(1, 65530))
    assert vocab[261] == b"\n\n"
    assert vocab[65529] == b" " * 128
    assert all(vocab[b + 1] == bytes([b]) for b in range(256))  # ids 1..256 are the bytes
    assert (tok.vocab_size, tok.pad_id, VOCAB_SIZE, PAD_ID) == (65536, 0, 65536, 0)


def test_matches_official_vocab(official):
    assert load_vocab(DEFAULT_VOCAB_PATH) == official.idx2token


def test_eiffel(tok):
    assert tok.encode(EIFFEL) == EIFFEL_IDS
    assert tok.decode(EIFFEL_IDS) == EIFFEL
    assert tok.encode("\n\n") == [261]
    assert tok.encode("Hello world") == [33155, 40213]


# ---- encoding equals the official tokenizer ---------------------------------------------


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_corpus_matches_official(tok, official, text):
    ids = tok.encode(text)
    assert ids == official.encode(text)
    assert tok.decode(ids) == text


def test_whole_corpus_and_batch(tok, official):
    joined = "\n\n".join(CORPUS)
    assert tok.encode(joined) == official.encode(joined)
    assert tok.encode_batch(CORPUS) == [official.encode(t) for t in CORPUS]
    assert tok.encode_batch([]) == []


def test_random_unicode_matches_official(tok, official):
    rng = random.Random(1234)
    for _ in range(300):
        text = _random_text(rng, rng.randrange(0, 120))
        ids = tok.encode(text)
        assert ids == official.encode(text), text
        assert tok.decode(ids) == text


def test_random_bytes_match_official(tok, official):
    rng = random.Random(5678)
    for _ in range(300):
        data = rng.randbytes(rng.randrange(0, 200))
        ids = tok.encode_bytes(data)
        assert ids == official.encodeBytes(data)
        assert tok.decode_bytes(ids) == data
    # Runs of one byte exercise the deepest chains (128 spaces, 80 '#').
    for b in (0x20, 0x23, 0x2D, 0x0A, 0x09, 0xFF, 0xE4):
        for n in (1, 2, 3, 17, 127, 128, 129, 300):
            data = bytes([b]) * n
            assert tok.encode_bytes(data) == official.encodeBytes(data)
    assert tok.encode_bytes(bytearray(b"ab\xff")) == tok.encode_bytes(memoryview(b"ab\xff"))


def test_every_token_encodes_to_itself(tok):
    # Greedy longest match: each token string alone is matched by its own id.
    vocab = load_vocab(DEFAULT_VOCAB_PATH)
    got = [tok.encode_bytes(t) for t in vocab.values()]
    assert got == [[i] for i in vocab]


def test_long_strings_match_official(tok, official):
    rng = random.Random(99)
    pieces = CORPUS + [_random_text(rng, 50) for _ in range(20)]
    text = "".join(rng.choice(pieces) for _ in range(2000))
    text = text.encode()[:100_000].decode("utf-8", "ignore")
    assert len(text.encode()) > 99_000
    ids = tok.encode(text)
    assert ids == official.encode(text)
    assert tok.decode(ids) == text
    spaces = " " * 100_000  # one token per 128 spaces
    assert tok.encode(spaces) == [65529] * 781 + official.encode(" " * 32)


# ---- decoding ----------------------------------------------------------------------------


def test_decode_invalid_utf8_does_not_raise(tok):
    euro = tok.encode("€")  # 3 UTF-8 bytes
    assert tok.decode_bytes(euro) == b"\xe2\x82\xac"
    assert tok.decode([0xE2 + 1]) == "\ufffd"  # id = byte + 1: a cut multi-byte char
    assert tok.decode([0xFF + 1, *tok.encode("ok")]) == "\ufffdok"
    assert tok.decode_bytes([0xFF + 1]) == b"\xff"


def test_decode_inputs(tok):
    ids = tok.encode("pad me")
    assert tok.decode([0, 0, *ids, 0]) == "pad me"  # pad id is skipped
    assert tok.decode(np.array([0, *ids], dtype=np.int32)) == "pad me"
    assert tok.decode(np.array([[0, *ids]], dtype=np.int64)) == "pad me"  # flattened
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "pad me"
    assert tok.decode(i for i in ids) == "pad me"
    assert tok.decode(tuple(ids)) == "pad me"
    assert tok.decode([np.int64(i) for i in ids]) == "pad me"
    assert tok.decode([]) == "" and tok.decode_bytes([]) == b""
    assert tok.decode(261) == "\n\n"
    import jax.numpy as jnp  # a device array of ids (generation's output): TypeError before

    assert tok.decode(jnp.asarray([0, *ids], jnp.int32)) == "pad me"


def test_decode_errors(tok):
    for bad in (65530, 65535, 65536, -1, 10**9):
        with pytest.raises(ValueError, match=f"unknown token id {bad}"):
            tok.decode([1, bad, 2])
    with pytest.raises(ValueError, match="unknown token id -5"):
        tok.decode(np.array([3, -5]))
    with pytest.raises(ValueError, match="unknown token id 70000"):
        tok.decode(x for x in [1, 70000])
    with pytest.raises(TypeError, match="str"):
        tok.decode([1, "a"])
    with pytest.raises(TypeError, match="float"):
        tok.decode(np.array([1.0, 2.0]))


# ---- pad_left ----------------------------------------------------------------------------


def test_pad_left_default_length(tok):
    out = tok.pad_left([[1, 2, 3], [4], []])
    assert out.dtype == np.int32 and out.shape == (3, 3)
    assert out.tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]


def test_pad_left_explicit_length_and_truncation(tok):
    batch = [[1, 2, 3, 4, 5], [6, 7], []]
    assert tok.pad_left(batch, 4).tolist() == [[2, 3, 4, 5], [0, 0, 6, 7], [0, 0, 0, 0]]
    assert tok.pad_left(batch, 6).tolist()[1] == [0, 0, 0, 0, 6, 7]
    assert tok.pad_left(batch, 0).shape == (3, 0)
    assert tok.pad_left([np.array([9, 8, 7]), (5,)], 2).tolist() == [[8, 7], [0, 5]]
    with pytest.raises(ValueError, match="row 0 has 5 tokens > length 4"):
        tok.pad_left(batch, 4, truncate="error")
    assert tok.pad_left([[1, 2]], 2, truncate="error").tolist() == [[1, 2]]


def test_pad_left_refuses_ids_that_are_not_token_ids(tok):
    # Before, 1.7 became id 1, True id 1 and 2**40 wrapped around in the int32 array.
    with pytest.raises(TypeError, match=r"row 1: token ids must be integers, got float64"):
        tok.pad_left([[1, 2], [1.7, 3]])
    with pytest.raises(TypeError, match=r"row 0: token ids must be integers, got bool"):
        tok.pad_left([[True, False]])
    with pytest.raises(ValueError, match=r"row 0: token id -1 is outside"):
        tok.pad_left([[5, -1]])
    with pytest.raises(ValueError, match=r"row 1: token id 1099511627776 is outside"):
        tok.pad_left([[5], [2**40]])
    assert tok.pad_left([np.array([7, 8], np.uint16)], 3).tolist() == [[0, 7, 8]]


def test_pad_left_edge_cases(tok):
    assert tok.pad_left([]).shape == (0, 0)
    assert tok.pad_left([[], []]).shape == (2, 0)
    assert tok.pad_left([], 3).shape == (0, 3)
    with pytest.raises(ValueError, match="truncate"):
        tok.pad_left([[1]], 2, truncate="right")
    with pytest.raises(ValueError, match="length"):
        tok.pad_left([[1]], -1)
    ids = tok.encode_batch(["The Eiffel tower", "is"])
    padded = tok.pad_left(ids)
    assert [tok.decode(row) for row in padded] == ["The Eiffel tower", "is"]


# ---- errors and construction -------------------------------------------------------------


def test_encode_type_errors(tok):
    with pytest.raises(TypeError, match="encode\\(\\) expects str, got bytes"):
        tok.encode(b"abc")
    with pytest.raises(TypeError, match="got NoneType"):
        tok.encode(None)
    with pytest.raises(TypeError, match="got int"):
        tok.encode(5)
    with pytest.raises(TypeError, match="encode_bytes\\(\\) expects bytes, got str"):
        tok.encode_bytes("abc")
    with pytest.raises(TypeError, match="single str"):
        tok.encode_batch("abc")
    with pytest.raises(TypeError, match="got int"):
        tok.encode_batch(["a", 1])
    with pytest.raises(UnicodeEncodeError):
        tok.encode("lone \ud800 surrogate")


def test_explicit_path_shares_tables(tmp_path, tok):
    assert WorldTokenizer(str(DEFAULT_VOCAB_PATH))._findall == tok._findall  # cached
    copy = tmp_path / "vocab.txt"
    shutil.copy(DEFAULT_VOCAB_PATH, copy)
    other = WorldTokenizer(copy)
    assert other.encode(EIFFEL) == EIFFEL_IDS
    assert "vocab.txt" in repr(other)


def test_pickle_by_path(tmp_path, tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert len(pickle.dumps(tok)) < 500  # the path, not the tables
    assert clone.encode(EIFFEL) == EIFFEL_IDS and clone.vocab_path == DEFAULT_VOCAB_PATH
    copy = tmp_path / "v.txt"
    shutil.copy(DEFAULT_VOCAB_PATH, copy)
    assert pickle.loads(pickle.dumps(WorldTokenizer(copy))).vocab_path == copy


def test_bad_vocab_files(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 'a' 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.txt:1: .*byte length 1 != declared 2"):
        load_vocab(bad)
    bad.write_text("1 __import__('os') 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.txt:1"):
        load_vocab(bad)  # never evaluated
    bad.write_text("0 'a' 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="reserved"):
        load_vocab(bad)
    bad.write_text("1 'a' 1\n2 'b' 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="single-byte tokens"):
        load_vocab(bad)
    with pytest.raises(FileNotFoundError):
        WorldTokenizer(tmp_path / "missing.txt")


def test_small_vocab_regex_is_greedy_longest():
    # The trie regex on a toy vocab where backtracking matters ("abcd" isn't a token).
    tokens = [bytes([b]) for b in range(256)] + [b"ab", b"abc", b"abcde", b"bd", b"bde"]
    regex = compile_trie_regex(tokens)
    assert regex.findall(b"abcdabcdeabd") == [b"abc", b"d", b"abcde", b"ab", b"d"]
    assert regex.findall(b"bdebdx") == [b"bde", b"bd", b"x"]
    with pytest.raises(ValueError):
        compile_trie_regex([b"a", b""])
