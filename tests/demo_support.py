"""Shared pieces of the demo app tests: a running app, a small chat model, a small corpus."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rwkv_mm import assets

DOCS = {
    "chat.md": "# Chatting\n\nThe chat tab streams replies from an RWKV language model.\n"
    "Each browser keeps its own conversation state.\n",
    "search.md": "# Searching\n\nPick a folder, build its index, then type a query.\n"
    "Results show the file path, the lines and a snippet.\n",
    "vision.md": "# Classifying images\n\nUpload a picture of clothing; the Vision-RWKV model\n"
    "returns the five most likely labels such as sneaker or ankle boot.\n",
}


def write_docs(folder: Path) -> Path:
    """A small corpus of three markdown files in `folder` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


def bundled_lm_available() -> bool:
    return (assets.ROOT / "tiny-lm" / "model.safetensors").is_file()


def bundled_embedder_available() -> bool:
    return (assets.ROOT / "embedder" / "model.safetensors").is_file()


def synthetic_lm(path: Path) -> Path:
    """A random two-layer RWKV-7 checkpoint with a byte vocabulary (the chat tests' model when the bundled
    tiny LM is absent): replies are noise, but they stream."""
    from safetensors.torch import save_file

    from rwkv_mm.lm.checkpoint import RWKVConfig, synthetic_state_dict

    config = RWKVConfig("v7", 2, 64, 256, 256, d_decay=16, d_aaa=16, d_mv=16, d_gate=16)
    tensors = {k: v.contiguous() for k, v in synthetic_state_dict(config, seed=0).items()}
    save_file(tensors, str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(tmp: Path, lm: Path | None = None, embedder=None) -> Iterator[tuple[str, Path]]:
    """Launch the demo in this process on a free loopback port; yields (url, docs folder).

    Args:
        tmp: a scratch folder (indexes and the test corpus go there).
        lm: the chat model; None = the bundled tiny LM.
        embedder: the search embedder; None = the bundled one.
    """
    from demos import app, search_tab

    docs = write_docs(tmp / "docs")
    search = search_tab.SearchBackend(tmp / "indexes", embedder=embedder)
    demo = app.build_app(lm=lm, search_backend=search, seed=0)
    url = app.launch(demo, port=free_port(), block=False)
    try:
        yield url, docs
    finally:
        demo.close()
        search.close()
