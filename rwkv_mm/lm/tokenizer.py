"""Tokenizers of the language models: RWKV World (greedy byte trie), GPT-NeoX 20B (HF `tokenizers`), bytes.

Every tokenizer maps ids to byte strings, so they share one decoding path: ``decode(ids)`` is the UTF-8
decoding (invalid bytes become U+FFFD) of the joined token bytes, and ``stream_decoder()`` yields the same
text piece by piece, holding back the bytes of a character that a token split.

- ``WorldTokenizer``: the RWKV World vocabulary (``rwkv_vocab_v20230424.txt``; lines ``id literal length``,
  ids 1..65529, id 0 = end of text). Encoding is the greedy longest-prefix match over UTF-8 bytes of the
  ``rwkv`` pip package's ``TRIE_TOKENIZER`` (BlinkDL/ChatRWKV), same ids on every string. Backends: "cpp"
  (``csrc/world_tokenizer.cpp``, built on first use with ``torch.utils.cpp_extension``) and "python"
  (a dict trie, always available); "auto" takes "cpp" unless it cannot be built or ``RWKV_MM_KERNELS=off``.
- ``HFTokenizer``: a HF ``tokenizers`` JSON file, e.g. ``20B_tokenizer.json`` (the GPT-NeoX-20B BPE of the
  RWKV-4 Pile models; id 0 = ``<|endoftext|>``). It NFC-normalises its input, so ``decode(encode(s))`` is
  ``unicodedata.normalize("NFC", s)``; added tokens (including the special ones) decode to their text, as
  HF's ``decode(ids, skip_special_tokens=False)``.
- ``ByteTokenizer``: 257 ids, 0 = end of text and byte ``b`` = id ``b + 1`` (World's ids for single bytes).
  A 256-row model can use it too: the one id it lacks, 256 (byte 0xFF), never occurs in UTF-8.

Model vocabularies are padded (World to 65536, Pile RWKV-7 to 50304): ids below ``vocab_size`` that have no
text decode to "", ids outside it raise ValueError.
"""

from __future__ import annotations

import ast
import codecs
import functools
import logging
import operator
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = [
    "Tokenizer",
    "StreamDecoder",
    "WorldTokenizer",
    "HFTokenizer",
    "ByteTokenizer",
    "load_tokenizer",
    "tokenizer_for_vocab_size",
]

logger = logging.getLogger(__name__)

NAMES = ("world", "20b", "bytes")
WORLD_VOCAB = "rwkv_vocab_v20230424.txt"
NEOX_20B = "20B_tokenizer.json"
MAX_ID = 1 << 24  # a sanity bound on vocabulary ids (the id -> bytes table is dense)
CSRC = Path(__file__).resolve().parent / "csrc" / "world_tokenizer.cpp"


class StreamDecoder:
    """Turns token ids into text one at a time, emitting only complete characters.

    ``feed(id)`` returns the text completed by that token ("" while a character is still partial);
    ``flush()`` returns what is left (an unfinished character becomes U+FFFD) and resets the decoder.
    The pieces of a stream followed by ``flush()`` join to ``tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._token_bytes = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """The text completed by ``token_id``."""
        return self._utf8.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """The rest of the text; the decoder starts afresh afterwards."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class Tokenizer:
    """What every tokenizer offers: text <-> ids, end-of-text id, and a streaming decoder.

    Subclasses set ``name``, ``vocab_size``, ``eos_id`` and the id -> bytes table ``_bytes`` (a list of
    ``vocab_size`` byte strings), and implement ``encode``.
    """

    name: str
    vocab_size: int
    eos_id: int
    _bytes: list[bytes]

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (b"" for end of text and padding ids)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id must be in [0, {self.vocab_size}) for {self.name}, got {token_id}")
        return self._bytes[token_id]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The joined bytes of ``ids`` (which may end inside a UTF-8 character)."""
        table = self._bytes
        try:
            if len(ids) and min(ids) < 0:
                raise IndexError
            return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not _is_id(i, self.vocab_size))
            raise ValueError(
                f"token id must be in [0, {self.vocab_size}) for {self.name}, got {bad!r}"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        """A decoder fed one id at a time that emits only complete characters."""
        return StreamDecoder(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def _is_id(value, vocab_size: int) -> bool:
    try:
        return 0 <= operator.index(value) < vocab_size
    except TypeError:
        return False


def _pad64(n: int) -> int:
    return -(-n // 64) * 64


def read_world_vocab(path: str | os.PathLike) -> dict[int, bytes]:
    """Parse a World vocabulary file: lines ``<id> <str or bytes literal> <byte length>``.

    Literals are read with ``ast.literal_eval`` (nothing in the file is executed) and must be a str
    (taken as UTF-8) or bytes of the stated length.

    Raises:
        ValueError: a malformed line, a literal that is not str/bytes, a wrong length, a repeated or
            out-of-range id.
    """
    vocab: dict[int, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            first, last = line.find(" "), line.rfind(" ")
            if first < 0 or last <= first:
                raise ValueError(f"{where}: expected '<id> <literal> <length>', got {line[:80]!r}")
            try:
                idx, length = int(line[:first]), int(line[last + 1 :])
                token = ast.literal_eval(line[first + 1 : last].strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
                raise ValueError(f"{where}: not '<id> <literal> <length>': {line[:80]!r} ({err})") from None
            if isinstance(token, str):
                token = token.encode("utf-8")
            if not isinstance(token, bytes):
                kind = type(token).__name__
                raise ValueError(f"{where}: the token must be a str or bytes literal, got {kind}")
            if len(token) != length or length == 0:
                raise ValueError(f"{where}: the token has {len(token)} bytes, the line says {length}")
            if idx in vocab or not 0 <= idx < MAX_ID:
                problem = "repeated" if idx in vocab else f"out of range [0, {MAX_ID})"
                raise ValueError(f"{where}: {problem} token id {idx}")
            vocab[idx] = token
    if not vocab:
        raise ValueError(f"{path}: no tokens")
    return vocab


@functools.cache
def _world_extension() -> tuple[ModuleType | None, str]:
    """The C++ World trie module, built on first use (then cached on disk), or None and why not."""
    try:
        import torch.utils.cpp_extension as cpp_extension

        logger.info("loading the C++ World tokenizer (compiled on first use, then cached)")
        module = cpp_extension.load(
            name="rwkv_mm_world_tokenizer", sources=[str(CSRC)], extra_cflags=["-O3"], verbose=False
        )
        return module, ""
    except Exception as err:  # noqa: BLE001 -- any build or load failure means "not available"
        text = str(err).strip()
        return None, f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


class _PythonTrie:
    """Greedy longest match with a dict trie: the plain-Python twin of the C++ encoder."""

    def __init__(self, tokens: dict[bytes, int]) -> None:
        self.root: dict = {}
        for token, idx in tokens.items():
            node = self.root
            for byte in token:
                node = node.setdefault(byte, {})
            node[-1] = idx  # -1: the id of the token ending here

    def encode(self, data: bytes) -> list[int]:
        out: list[int] = []
        i, n, root = 0, len(data), self.root
        while i < n:
            node, j, best, end = root, i, -1, i
            while j < n:
                node = node.get(data[j])
                if node is None:
                    break
                j += 1
                idx = node.get(-1)
                if idx is not None:
                    best, end = idx, j
            if best < 0:
                raise ValueError(
                    f"no token of the vocabulary is a prefix of the input at offset {i} (byte {data[i]:#04x})"
                )
            out.append(best)
            i = end
        return out


class WorldTokenizer(Tokenizer):
    """The RWKV World tokenizer: greedy longest match over UTF-8 bytes, no normalisation.

    Args:
        path: a World vocabulary file (default: the bundled ``rwkv_vocab_v20230424.txt``).
        backend: "auto", "cpp" or "python" (see the module docstring).
        vocab_size: the model's id space (default: the largest id + 1 rounded up to a multiple of 64).
        name: shown in reprs and errors (default: "world" for the bundled file, else the file name).
    """

    BACKENDS = ("auto", "cpp", "python")

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        backend: str = "auto",
        vocab_size: int | None = None,
        name: str | None = None,
    ) -> None:
        if backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {self.BACKENDS}, got {backend!r}")
        bundled = path is None
        path = Path(path) if path is not None else _asset(WORLD_VOCAB)
        vocab = read_world_vocab(path)
        needed = max(vocab) + 1
        self.vocab_size = _pad64(needed) if vocab_size is None else vocab_size
        if self.vocab_size < needed:
            raise ValueError(f"vocab_size must be at least {needed} for {path}, got {vocab_size}")
        self.name = name or ("world" if bundled else path.name)
        self.eos_id = 0
        self.path = path
        self._bytes = [b""] * self.vocab_size
        for idx, token in vocab.items():
            self._bytes[idx] = token
        # in file order, so that a repeated byte string keeps its last id (as the reference's dict does)
        self._tokens = [(token, idx) for idx, token in vocab.items()]
        self._requested = backend
        self._encoder = None
        self.backend = ""  # "cpp" or "python" once the encoder is built (on the first encode)

    def _build_encoder(self):
        if self._requested == "auto" and os.environ.get("RWKV_MM_KERNELS", "").lower() == "off":
            logger.info("RWKV_MM_KERNELS=off: the World tokenizer uses its Python trie")
        elif self._requested in ("auto", "cpp"):
            module, reason = _world_extension()
            if module is not None:
                self.backend = "cpp"
                return module.WorldTrie(self._tokens)
            if self._requested == "cpp":
                raise RuntimeError(f"the C++ World tokenizer is unavailable: {reason}")
            logger.warning("the C++ World tokenizer is unavailable (%s); using the Python trie", reason)
        self.backend = "python"
        return _PythonTrie(dict(self._tokens))

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` (greedy longest match over its UTF-8 bytes)."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """The token ids of raw bytes (need not be valid UTF-8)."""
        if self._encoder is None:
            self._encoder = self._build_encoder()
        return self._encoder.encode(bytes(data))


class HFTokenizer(Tokenizer):
    """A HF ``tokenizers`` JSON tokenizer with a ByteLevel vocabulary (GPT-2 / GPT-NeoX style).

    Args:
        path: the JSON file (default: the bundled ``20B_tokenizer.json``).
        vocab_size: the model's id space when padded (e.g. 50304); default: the file's (50277 for 20B).
        name: default "20b" for the bundled file, else the file name.
    """

    def __init__(
        self, path: str | os.PathLike | None = None, vocab_size: int | None = None, name: str | None = None
    ) -> None:
        from tokenizers import Tokenizer as _HF

        bundled = path is None
        path = Path(path) if path is not None else _asset(NEOX_20B)
        self.hf = _HF.from_file(str(path))
        self.path = path
        self.name = name or ("20b" if bundled else path.name)
        needed = self.hf.get_vocab_size(with_added_tokens=True)
        self.vocab_size = needed if vocab_size is None else vocab_size
        if self.vocab_size < needed:
            raise ValueError(f"vocab_size must be at least {needed} for {path}, got {vocab_size}")
        eos = self.hf.token_to_id("<|endoftext|>")
        self.eos_id = 0 if eos is None else eos
        self._bytes = _hf_token_bytes(self.hf, self.vocab_size)

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` (after the file's normaliser, NFC for 20B)."""
        return self.hf.encode(text, add_special_tokens=False).ids


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character of each byte, reversed (char -> byte)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _hf_token_bytes(hf, vocab_size: int) -> list[bytes]:
    """id -> bytes: added tokens give their text; model tokens map each char back through the byte alphabet
    (a char outside it stands for its own UTF-8, as in HF's ByteLevel decoder)."""
    alphabet = _byte_level_alphabet()
    added = {idx: tok.content for idx, tok in hf.get_added_tokens_decoder().items()}
    table = [b""] * vocab_size
    for token, idx in hf.get_vocab(with_added_tokens=False).items():
        table[idx] = b"".join(bytes([alphabet[c]]) if c in alphabet else c.encode("utf-8") for c in token)
    for idx, content in added.items():
        table[idx] = content.encode("utf-8")
    return table


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: id 0 = end of text, byte ``b`` = id ``b + 1`` (257 ids)."""

    def __init__(self) -> None:
        self.name = "bytes"
        self.vocab_size = 257
        self.eos_id = 0
        self._bytes = [b"", *(bytes([b]) for b in range(256))]

    def encode(self, text: str) -> list[int]:
        """One id per UTF-8 byte of ``text`` (byte + 1)."""
        return [b + 1 for b in text.encode("utf-8")]


def _asset(filename: str) -> Path:
    from rwkv_mm import assets

    return assets.path("tokenizers") / filename


@functools.cache
def _builtin(name: str, vocab_size: int | None = None) -> Tokenizer:
    """The shared instance of a bundled tokenizer (tokenizers hold no state, so sharing is safe)."""
    if name == "world":
        return WorldTokenizer(vocab_size=vocab_size)
    if name == "20b":
        return HFTokenizer(vocab_size=vocab_size)
    return ByteTokenizer()


def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """A tokenizer by name ("world", "20b", "bytes"; shared instances) or from a file: a World-format
    vocabulary (``.txt``) or a HF tokenizer (``.json``).

    Raises:
        FileNotFoundError: a path (it has a suffix or a folder) that does not exist.
        ValueError: neither a known name nor a path, or a file of another kind.
    """
    text = os.fspath(name_or_path)
    if not isinstance(name_or_path, os.PathLike) and text.lower() in NAMES:
        return _builtin(text.lower())
    path = Path(text).expanduser()
    looks_like_path = isinstance(name_or_path, os.PathLike) or path.suffix or os.sep in text or path.exists()
    if not looks_like_path:
        choices = ", ".join(NAMES)
        raise ValueError(f"unknown tokenizer {text!r}: expected one of {choices} or a .txt / .json path")
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    if path.suffix == ".txt":
        return WorldTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    raise ValueError(
        f"cannot tell the tokenizer kind of {path}: expected a .txt World vocabulary or a .json file"
    )


def tokenizer_for_vocab_size(n: int) -> Tokenizer:
    """The tokenizer of a model whose embedding has ``n`` rows: 65536 World, 50277/50304 20B, 256/257 bytes.

    Raises:
        ValueError: any other size.
    """
    if n == 65536:
        return _builtin("world")
    if n in (50277, 50304):
        return _builtin("20b", None if n == 50277 else n)
    if n in (256, 257):
        return _builtin("bytes")
    raise ValueError(f"no known tokenizer has a vocabulary of {n} ids (known: 65536, 50277, 50304, 256, 257)")
