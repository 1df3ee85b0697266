"""The language-model face: official RWKV checkpoints (v4-v7), the RWKV LM, tokenizers."""

from .checkpoint import RWKVConfig, load_checkpoint, load_state_file
from .model import RWKVLM
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
    "RWKVConfig",
    "RWKVLM",
    "load_checkpoint",
    "load_state_file",
    "ByteTokenizer",
    "HFTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "WorldTokenizer",
    "load_tokenizer",
    "tokenizer_for_vocab_size",
]
