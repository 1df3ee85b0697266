"""The language-model face: tokenizers (and, later, the RWKV LM, sampling and chat)."""

from .tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    StreamDecoder,
    Tokenizer,
    WorldTokenizer,
    load_tokenizer,
    tokenizer_for_vocab_size,
)

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "WorldTokenizer",
    "load_tokenizer",
    "tokenizer_for_vocab_size",
]
