"""Tokenizers: round trips, exactness of the World encoder against the rwkv pip package, streaming, errors."""

import unicodedata

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkv_mm.lm import tokenizer as tokmod
from rwkv_mm.lm.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    WorldTokenizer,
    load_tokenizer,
    read_world_vocab,
    tokenizer_for_vocab_size,
)

torch.set_num_threads(1)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# pieces that hit long World tokens, token boundaries inside characters, and the whitespace tokens
WORDS = [
    " the",
    "The",
    "Hello",
    " world",
    "\n\n",
    "\n",
    "\r\n",
    "\t",
    "    ",
    "                ",
    "--------",
    "####",
    "def ",
    "return",
    "你好",
    "世界",
    "日本語",
    "🙂",
    "👍🏽",
    "👨‍👩‍👧",
    "é",
    "e\u0301",
    "\u200b",
    "\x00",
    "\x7f",
    "<|endoftext|>",
    "User:",
    " Assistant:",
    "<think>",
    "ا",
    "Ω",
    "\ufeff",
    "\U0010ffff",
]
CHARS = list("ab .,\n\r\t\x00你好界🙂é\u0301\u200b\U0001f3fd")
TEXTS = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from(CHARS)),
    st.lists(st.sampled_from(WORDS), max_size=40).map("".join),
)
TRICKY = [
    "",
    " ",
    "\n",
    "\n\n\n",
    "User: hi\n\nAssistant:",
    "Assistant: <think",
    " Hello",
    "Hello ",
    "\x00\x00\r\n\r\n",
    "你好，世界！🙂🎉👨‍👩‍👧‍👦",
    "e\u0301\u200b\ufeff",
    " " * 300,
    "-" * 161,
    "\U0010ffff\U00010000",
    "def f(x):\n    return x ** 2  # done\n",
]


@pytest.fixture(scope="module")
def reference():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(str(tokmod._asset(tokmod.WORLD_VOCAB)))


def _world(backend):
    tok = WorldTokenizer(backend=backend)
    try:
        tok.encode("x")
    except RuntimeError as err:  # an explicit "cpp" that cannot be built here
        pytest.skip(str(err))
    return tok


@pytest.fixture(scope="module", params=[pytest.param("cpp", id="cpp"), pytest.param("python", id="python")])
def world(request):
    return _world(request.param)


@pytest.fixture(scope="module")
def neox():
    return HFTokenizer()


def test_world_known_ids(world):
    assert world.backend in ("cpp", "python")
    assert world.encode("User: hi\n\nAssistant:") == [24281, 59, 4571, 261, 5585, 41693, 59]
    assert world.encode("Assistant: <think") == [5585, 41693, 59, 295, 35762]
    assert world.encode("\n") == [11] and world.encode(" ") == [33] and world.encode("\n\n") == [261]
    assert world.vocab_size == 65536 and world.eos_id == 0 and world.name == "world"


@pytest.mark.parametrize("text", [pytest.param(t, id=f"tricky{i}") for i, t in enumerate(TRICKY)])
def test_world_matches_reference_tricky(world, reference, text):
    assert world.encode(text) == reference.encode(text)
    assert world.decode(world.encode(text)) == text


@SETTINGS
@given(text=TEXTS)
def test_world_matches_reference(world, reference, text):
    ids = world.encode(text)
    assert ids == reference.encode(text)
    assert world.decode(ids) == text


@SETTINGS
@given(data=st.binary(max_size=200))
def test_world_encode_bytes(world, reference, data):
    ids = world.encode_bytes(data)
    assert ids == reference.encodeBytes(data)
    assert world.decode_bytes(ids) == data


@SETTINGS
@given(text=TEXTS)
def test_bytes_roundtrip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == [b + 1 for b in text.encode("utf-8")]
    assert tok.decode(ids) == text
    assert tok.decode([tok.eos_id]) == ""


@SETTINGS
@given(text=TEXTS)
def test_20b_roundtrip_is_nfc(neox, text):
    """20B normalises to NFC, so only NFC text comes back unchanged; decoding matches HF's own decode."""
    ids = neox.encode(text)
    assert neox.decode(ids) == unicodedata.normalize("NFC", text)
    assert neox.decode(ids) == neox.hf.decode(ids, skip_special_tokens=False)


def test_20b_known_ids(neox):
    assert neox.encode("Bob: hi\n\nAlice:") == [26845, 27, 14260, 187, 187, 2422, 547, 27]
    assert neox.eos_id == 0 and neox.vocab_size == 50277 and neox.name == "20b"
    assert neox.encode("a<|endoftext|>b")[1] == 0


@pytest.mark.parametrize(
    "name",
    [pytest.param("world", id="world"), pytest.param("20b", id="20b"), pytest.param("bytes", id="bytes")],
)
@SETTINGS
@given(ids=st.lists(st.integers(0, 50276), max_size=30), text=TEXTS)
def test_stream_decoder(name, ids, text):
    """Streamed pieces join to decode(ids), for random ids (characters split, invalid bytes) and real text."""
    tok = load_tokenizer(name)
    ids = [i % tok.vocab_size for i in ids]
    for seq, valid in ((ids, False), (tok.encode(text), True)):
        stream = tok.stream_decoder()
        pieces = [stream.feed(i) for i in seq]
        tail = stream.flush()
        assert "".join(pieces) + tail == tok.decode(seq)
        if valid:  # the text of valid UTF-8 comes out whole, with nothing left to flush
            assert tail == ""
            assert "".join(pieces) == (unicodedata.normalize("NFC", text) if name == "20b" else text)
    # the decoder is reusable after flush
    assert stream.feed(tok.encode("a")[0]) + stream.flush() == "a"


def test_stream_holds_back_split_character():
    tok = load_tokenizer("bytes")
    stream = tok.stream_decoder()
    emoji = tok.encode("🙂")
    assert [stream.feed(i) for i in emoji] == ["", "", "", "🙂"]
    assert stream.feed(tok.encode("🙂")[0]) == "" and stream.flush() == "\ufffd"


def test_decode_ids_outside_vocab():
    world = load_tokenizer("world")
    assert world.decode([0, 65535]) == ""  # end of text and padding ids have no text
    for bad in (65536, -1):
        with pytest.raises(ValueError, match=rf"\[0, 65536\).*{bad}"):
            world.decode([1, bad])
        with pytest.raises(ValueError, match=str(bad)):
            world.stream_decoder().feed(bad)


def test_load_tokenizer_names_and_paths(tmp_path):
    assert load_tokenizer("World") is load_tokenizer("world")
    assert isinstance(load_tokenizer("20B"), HFTokenizer)
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    vocab = tokmod._asset(tokmod.WORLD_VOCAB)
    by_path = load_tokenizer(vocab)
    assert isinstance(by_path, WorldTokenizer) and by_path.encode(" Hello") == [36786]
    assert isinstance(load_tokenizer(str(tokmod._asset(tokmod.NEOX_20B))), HFTokenizer)


@pytest.mark.parametrize(
    "arg, error, match",
    [
        pytest.param("gpt2", ValueError, "world, 20b, bytes", id="unknown-name"),
        pytest.param("missing/vocab.txt", FileNotFoundError, "missing/vocab.txt", id="missing-path"),
        pytest.param("nothere.json", FileNotFoundError, "nothere.json", id="missing-json"),
    ],
)
def test_load_tokenizer_errors(arg, error, match):
    with pytest.raises(error, match=match):
        load_tokenizer(arg)


def test_load_tokenizer_unknown_suffix(tmp_path):
    path = tmp_path / "vocab.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="vocab.bin"):
        load_tokenizer(path)


def test_tokenizer_for_vocab_size():
    assert tokenizer_for_vocab_size(65536).name == "world"
    assert tokenizer_for_vocab_size(50277).vocab_size == 50277
    padded = tokenizer_for_vocab_size(50304)
    assert padded.name == "20b" and padded.vocab_size == 50304 and padded.decode([50303]) == ""
    assert tokenizer_for_vocab_size(256).name == tokenizer_for_vocab_size(257).name == "bytes"
    with pytest.raises(ValueError, match="12345"):
        tokenizer_for_vocab_size(12345)


@pytest.mark.parametrize(
    "line, match",
    [
        pytest.param("1 __import__('os').system('touch {marker}') 1", "not '<id> <literal>", id="call"),
        pytest.param("1 5 1", "str or bytes", id="int-literal"),
        pytest.param("1 ['a'] 1", "str or bytes", id="list-literal"),
        pytest.param("1 'ab' 3", "2 bytes", id="wrong-length"),
        pytest.param("1 '' 0", "0 bytes", id="empty"),
        pytest.param("x 'a' 1", "not '<id>", id="bad-id"),
        pytest.param("1'a'1", "expected", id="no-spaces"),
        pytest.param("2 'c' 1", "repeated", id="repeated-id"),
        pytest.param("-3 'c' 1", "out of range", id="negative-id"),
    ],
)
def test_vocab_parsing_rejects(tmp_path, line, match):
    marker = tmp_path / "executed"
    path = tmp_path / "vocab.txt"
    path.write_text("2 'b' 1\n" + line.format(marker=marker) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        read_world_vocab(path)
    with pytest.raises(ValueError):
        load_tokenizer(path)
    assert not marker.exists()


@pytest.mark.parametrize("backend", [pytest.param("cpp", id="cpp"), pytest.param("python", id="python")])
def test_custom_vocab_matches_reference(tmp_path, backend):
    """A small vocabulary with a repeated string (the last id wins) and bytes tokens, vs the reference."""
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    lines = [f"{i + 1} {bytes([i])!r} 1" for i in range(256)]
    lines += [
        "300 'ab' 2",
        "301 'abc' 3",
        "302 'ab' 2",
        "303 b'\\xe4\\xbd' 2",
        "304 '你好' 6",
        "305 'abcdx' 5",
    ]
    path = tmp_path / "small.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ref = TRIE_TOKENIZER(str(path))
    tok = WorldTokenizer(path, backend=backend)
    try:
        tok.encode("")
    except RuntimeError as err:
        pytest.skip(str(err))
    assert tok.vocab_size == 320 and tok.name == "small.txt"
    for text in ["abcd", "ab", "abcdx", "你好你", "abab c", "\x00abc\xff"]:
        assert tok.encode(text) == ref.encode(text), text
    assert tok.encode("ab") == [302]


@pytest.mark.parametrize("backend", [pytest.param("cpp", id="cpp"), pytest.param("python", id="python")])
def test_unencodable_byte(tmp_path, backend):
    path = tmp_path / "tiny.txt"
    path.write_text("1 'a' 1\n2 'ab' 2\n", encoding="utf-8")
    tok = WorldTokenizer(path, backend=backend)
    try:
        assert tok.encode("aab") == [1, 2]
    except RuntimeError as err:
        pytest.skip(str(err))
    with pytest.raises(ValueError, match=r"offset 3 \(byte 0x63\)"):
        tok.encode("abac")


def test_kernels_off_uses_python(monkeypatch):
    monkeypatch.setenv("RWKV_MM_KERNELS", "off")
    tok = WorldTokenizer()
    assert tok.encode("Hello") == [33155] and tok.backend == "python"
    with pytest.raises(ValueError, match="backend"):
        WorldTokenizer(backend="rust")


def test_unbuildable_extension_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(tokmod, "_world_extension", lambda: (None, "RuntimeError: no C++ compiler"))
    tok = WorldTokenizer()
    assert tok.encode("Hello") == [33155] and tok.backend == "python"
    assert "no C++ compiler" in caplog.text
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        WorldTokenizer(backend="cpp").encode("Hello")
