"""rwkv_mm: one RWKV core under three faces (chat LM, Vision-RWKV, sentence embeddings)."""

__version__ = "0.1.0"
