"""The rwkv_mm demo: Chat, Search and Classify tabs in one local Gradio page.

    python -m demos.app [--host 127.0.0.1] [--port 7860] [--lm PATH] [--index-dir DIR]
    make demo

Local only: never a share link, Gradio's analytics off, no server-side rendering (no Node). Models load on
first use, so the page is up in seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path

import demos  # noqa: F401  (turns Gradio's analytics off before gradio is imported)

_IMPORTED_AT = time.perf_counter()  # before gradio's import: the start-up time logged by main()

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402

from demos import chat_tab, classify_tab, search_tab  # noqa: E402

logger = logging.getLogger(__name__)

TITLE = "rwkv_mm demo"
INTRO = (
    "One RWKV core, three faces: **Chat** with an RWKV language model, **Search** a folder with RWKV "
    "sentence embeddings, **Classify** an image with Vision-RWKV. Everything runs locally on this machine."
)


# small images (Fashion-MNIST is 28x28) are shown enlarged with crisp pixels
CSS = """
#cls-image img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
"""


def build_app(
    lm: str | Path | None = None,
    index_dir: str | Path | None = None,
    search_backend: search_tab.SearchBackend | None = None,
    seed: int | None = None,
) -> gr.Blocks:
    """The demo page.

    Args:
        lm: the chat model (checkpoint file or folder); None = the bundled tiny LM. Defaults to None.
        index_dir: where search indexes are kept; None = `search_tab.default_index_dir()`. Defaults to None.
        search_backend: a ready SearchBackend (tests pass one with a small index); overrides `index_dir`.
        seed: seeds each chat session's sampler; None = random. Defaults to None.

    Returns:
        The gr.Blocks, queued (one job at a time per event, at most 16 waiting), not launched.
    """
    chat = chat_tab.ChatBackend(lm, seed=seed)
    search = search_backend or search_tab.SearchBackend(index_dir)
    classify = classify_tab.ClassifyBackend()
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Tab("Chat", id="chat"):
            chat_tab.build(chat)
        with gr.Tab("Search", id="search"):
            search_tab.build(search)
        with gr.Tab("Classify", id="classify"):
            classify_tab.build(classify)
    demo.queue(max_size=16, default_concurrency_limit=1)
    demo.rwkv_backends = {"chat": chat, "classify": classify, "search": search}  # for warm_up
    return demo


def warm_up(demo: gr.Blocks) -> None:
    """Load the default models in the background after the page is up (each failure only logged)."""
    for name, backend in getattr(demo, "rwkv_backends", {}).items():
        start = time.perf_counter()
        try:
            backend.warm_up()
            logger.info("%s model ready in %.1f s", name, time.perf_counter() - start)
        except Exception as e:  # the tab shows the problem when it is used
            logger.warning("%s model not loaded: %s", name, e)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Serve `demo` locally; returns its URL (with `block=False` the call returns once the server is up)."""
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=False,  # never a public tunnel
        ssr_mode=False,  # no Node server
        show_error=True,
        css=CSS,
        inbrowser=False,
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return url


def main(argv: list[str] | None = None) -> int:
    """`python -m demos.app`: parse the flags, build the page and serve it until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m demos.app", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--lm", default=None, help="chat model checkpoint (default: the bundled tiny LM)")
    parser.add_argument("--index-dir", default=None, help="where search indexes are kept")
    parser.add_argument("--seed", type=int, default=None, help="seed every chat session (default: random)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    demo = build_app(lm=args.lm, index_dir=args.index_dir, seed=args.seed)
    logger.info("page built in %.1f s", time.perf_counter() - start)
    url = launch(demo, args.host, args.port, block=False)
    logger.info("serving %s, %.1f s after start; Ctrl+C stops", url, time.perf_counter() - _IMPORTED_AT)
    threading.Thread(target=warm_up, args=(demo,), name="warm-up", daemon=True).start()
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
