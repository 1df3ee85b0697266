"""The language-model face: official RWKV checkpoints (v4-v7), the RWKV LM, tokenizers."""

from .checkpoint import RWKVConfig, load_checkpoint, load_state_file
from .model import RWKVLM
from .sampling import Sampler, SamplingParams, StopChecker, sample_batch, sample_logits
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
    "ChatSession",
    "Sampler",
    "SamplingParams",
    "StopChecker",
    "sample_batch",
    "sample_logits",
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


def __getattr__(name: str):
    # ChatSession is imported on first use, so that `python -m rwkv_mm.lm.chat` does not find its own
    # module already imported by this package
    if name == "ChatSession":
        from .chat import ChatSession

        return ChatSession
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
