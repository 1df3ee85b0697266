"""The demo app's endpoints, driven over HTTP with gradio_client (one app for the module, on loopback).

Chat uses the bundled tiny LM (a random byte-level checkpoint while it is absent), Search a deterministic
word-hash embedder on a three-file corpus (plus one test of the bundled embedder, and one of an install
without it), Classify the bundled Fashion-MNIST VRWKV on the example images.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the demo needs the demo extra: pip install -e '.[demo]'")
pytest.importorskip("gradio_client", reason="the demo tests need gradio_client (installed with gradio)")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from demos import classify_tab  # noqa: E402
from rwkv_mm.vision.data import FASHION_MNIST_CLASSES  # noqa: E402
from tests import demo_support  # noqa: E402
from tests.embed_helpers import HashEmbedder  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# gradio's queue calls pandas options that pandas 3 deprecates (harmless)
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
SAMPLING = dict(temperature=1.0, top_p=0.3, max_tokens=24, presence=0.5, frequency=0.5)


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory) -> Path | None:
    if demo_support.bundled_lm_available():
        return None
    return demo_support.synthetic_lm(tmp_path_factory.mktemp("lm") / "synthetic-v7.safetensors")


@pytest.fixture(scope="module")
def app(tmp_path_factory, chat_lm):
    with demo_support.running_app(
        tmp_path_factory.mktemp("demo"), lm=chat_lm, embedder=HashEmbedder(dim=64)
    ) as (url, docs):
        yield url, docs


def client(url: str) -> Client:
    """A fresh client: a new session (own gr.State), as a new browser tab would have."""
    return Client(url, verbose=False, download_files=False)


def chat(c: Client, message: str) -> list:
    """Send a message; returns every streamed (textbox, history) output, in order."""
    job = c.submit(message, *SAMPLING.values(), api_name="/chat")
    job.result(timeout=120)
    return job.outputs()


def text_of(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):  # [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


# --- chat


def test_chat_streams_a_reply(app):
    outputs = chat(client(app[0]), "Hello there")
    assert len(outputs) >= 2, f"expected several streamed updates, got {len(outputs)}"
    box, history = outputs[-1]
    assert box == ""
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert text_of(history[0]) == "Hello there"
    partial = [text_of(h[-1]) for _, h in outputs if h and h[-1]["role"] == "assistant"]
    assert partial[-1], "the reply is empty"
    assert any(len(p) < len(partial[-1]) for p in partial), "the reply arrived in one piece, not streamed"


def test_chat_sessions_are_separate(app):
    a, b = client(app[0]), client(app[0])
    chat(a, "first message from A")
    history_a = chat(a, "second message from A")[-1][1]
    history_b = chat(b, "only message from B")[-1][1]
    assert [text_of(m) for m in history_a if m["role"] == "user"] == [
        "first message from A",
        "second message from A",
    ]
    assert [text_of(m) for m in history_b if m["role"] == "user"] == ["only message from B"]


def test_chat_reset_and_retry(app):
    c = client(app[0])
    chat(c, "one")
    retried = c.predict(*SAMPLING.values(), api_name="/chat_retry")
    assert [m["role"] for m in retried] == ["user", "assistant"]
    assert c.predict(api_name="/chat_reset") == []
    history = chat(c, "two")[-1][1]
    assert [text_of(m) for m in history if m["role"] == "user"] == ["two"]


@pytest.mark.parametrize(
    "call, message",
    [
        pytest.param(lambda c: chat(c, "   \n "), "type a message first", id="empty-message"),
        pytest.param(
            lambda c: c.predict("/no/such/model.pth", api_name="/chat_load"),
            "no checkpoint at",
            id="missing-model",
        ),
        pytest.param(
            lambda c: c.predict(*SAMPLING.values(), api_name="/chat_retry"), "nothing to retry", id="retry"
        ),
    ],
)
def test_chat_bad_input_shows_a_message(app, call, message):
    c = client(app[0])
    with pytest.raises(AppError, match=message):
        call(c)
    assert chat(c, "still there?")[-1][1], "the app stopped answering after bad input"


def test_chat_loads_a_checkpoint_by_path(app, tmp_path):
    path = demo_support.synthetic_lm(tmp_path / "mine.safetensors")
    c = client(app[0])
    history, status = c.predict(str(path), api_name="/chat_load")
    assert history == []
    assert str(path) in status and "RWKV v7" in status
    assert chat(c, "hi")[-1][1][0]["role"] == "user"


def test_chat_without_a_model_says_so():
    from demos.chat_tab import ChatBackend, Sampling, UserInputError

    backend = ChatBackend("/no/such/model.pth")
    assert "/no/such/model.pth is missing" in backend.default_status()
    with pytest.raises(UserInputError, match="no model at /no/such/model.pth"):
        next(backend.stream("hello", None, Sampling()))


# --- search


def test_search_builds_and_queries(app):
    url, docs = app
    c = client(url)
    status = c.predict(str(docs), api_name="/search_index")
    assert "3 added" in status
    table, _ = c.predict(str(docs), "upload a picture of clothing", 2, api_name="/search")
    rows = table["data"]
    assert table["headers"] == ["path", "lines", "score", "snippet"]
    assert len(rows) == 2
    path, lines, score, snippet = rows[0]
    assert path == "vision.md"
    assert re.fullmatch(r"\d+(-\d+)?", lines)
    assert 0 < score <= 1.0001
    assert "Vision-RWKV" in snippet
    assert "0 added" in c.predict(str(docs), api_name="/search_index")  # incremental: nothing new


def test_search_builds_on_first_query(app, tmp_path):
    docs = demo_support.write_docs(tmp_path / "fresh")
    table, status = client(app[0]).predict(str(docs), "index and query", 1, api_name="/search")
    assert table["data"][0][0] == "search.md"
    assert "3 added" in status


@pytest.mark.parametrize(
    "folder, query, message",
    [
        pytest.param(None, "  ", "type a query first", id="empty-query"),
        pytest.param("/no/such/folder", "query", "no folder at", id="missing-folder"),
    ],
)
def test_search_bad_input_shows_a_message(app, folder, query, message):
    c = client(app[0])
    with pytest.raises(AppError, match=message):
        c.predict(folder or str(app[1]), query, 3, api_name="/search")


def test_search_with_the_bundled_embedder(tmp_path):
    from demos.search_tab import SearchBackend

    docs = demo_support.write_docs(tmp_path / "docs")
    backend = SearchBackend(tmp_path / "indexes")
    try:
        assert backend.problem() is None
        rows, status = backend.search(str(docs), "Which model classifies pictures of clothing?", 3)
        assert status is not None and "3 added" in status
        assert rows[0][0] == "vision.md", rows
    finally:
        backend.close()


def test_search_without_the_embedder_says_so(tmp_path, monkeypatch):
    from demos.search_tab import SearchBackend, UserInputError
    from rwkv_mm import assets

    monkeypatch.setattr(assets, "ROOT", tmp_path / "no-assets")  # an install without the embedder asset
    backend = SearchBackend(tmp_path / "indexes")
    try:
        assert "embedder" in backend.problem()
        with pytest.raises(UserInputError, match="embedder not available"):
            backend.search(str(demo_support.write_docs(tmp_path / "docs")), "query", 3)
    finally:
        backend.close()


# --- classify


def top(label: dict) -> tuple[str, list[dict]]:
    return label["label"], label["confidences"]


@pytest.mark.parametrize("image", classify_tab.example_images(), ids=lambda p: p.stem)
def test_classify_examples(app, image):
    label, _, status = client(app[0]).predict(
        handle_file(str(image)), "", "", True, False, api_name="/classify"
    )
    best, confidences = top(label)
    want = FASHION_MNIST_CLASSES[int(image.name.split("-")[0])]
    assert best == want, f"{image.name}: {best} ({status})"
    assert len(confidences) == 5
    assert sum(c["confidence"] for c in confidences) <= 1.0 + 1e-6
    assert want in status


def test_classify_light_background_photo(app, tmp_path):
    """A dark item on a white background (a product photo) is inverted to the training look."""
    from PIL import Image, ImageOps

    src = classify_tab.example_images()[1]  # trouser
    path = tmp_path / "photo.jpg"
    ImageOps.invert(Image.open(src).convert("L")).resize((112, 112)).convert("RGB").save(path)
    label, _, _ = client(app[0]).predict(handle_file(str(path)), "", "", True, False, api_name="/classify")
    assert top(label)[0] == "Trouser"


@pytest.mark.parametrize(
    "make, arch, ckpt, message",
    [
        pytest.param("corrupt", "", "", "could not read", id="corrupt-image"),
        pytest.param("text", "", "", "could not read", id="not-an-image"),
        pytest.param(
            "ok", "vrwkv_tiny", "/no/such/checkpoint.pth", "no checkpoint at", id="missing-checkpoint"
        ),
        pytest.param("ok", "vrwkv_tiny", "", "has no bundled weights", id="no-weights"),
    ],
)
def test_classify_bad_input_shows_a_message(app, tmp_path, make, arch, ckpt, message):
    if make == "corrupt":
        path = tmp_path / "broken.png"
        path.write_bytes(classify_tab.example_images()[0].read_bytes()[:60])
    elif make == "text":
        path = tmp_path / "notes.png"
        path.write_text("not an image")
    else:
        path = classify_tab.example_images()[0]
    c = client(app[0])
    with pytest.raises(AppError, match=message):
        c.predict(handle_file(str(path)), arch, ckpt, True, False, api_name="/classify")
    label, _, _ = c.predict(
        handle_file(str(path if make == "ok" else classify_tab.example_images()[0])),
        "",
        "",
        True,
        False,
        api_name="/classify",
    )
    assert label["label"], "the app stopped answering after bad input"


def test_classify_user_checkpoint_folder(app):
    """A folder written by `rwkv_mm.vision.train export` (here the bundled asset) loads as a user model."""
    from rwkv_mm import assets

    image = classify_tab.example_images()[9]
    label, _, status = client(app[0]).predict(
        handle_file(str(image)), "", str(assets.path("vrwkv-fmnist")), True, False, api_name="/classify"
    )
    assert top(label)[0] == "Ankle boot"
    assert "vrwkv-fmnist" in status


# --- the pieces behind the tabs


def test_transform_matches_training():
    """The upload goes through the same numbers as the training data (cfg: 1x28x28, mean/std, no resize)."""
    import numpy as np
    import torch
    from PIL import Image

    from rwkv_mm.vision.data import fashion_mnist_transform

    clf = classify_tab.ClassifyBackend().classifier()
    image = Image.open(classify_tab.example_images()[0])
    got = clf.transform(classify_tab.prepare(image, clf.in_chans))
    want = fashion_mnist_transform()(torch.from_numpy(np.array(image)))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_segmentation_overlay(tmp_path):
    """The overlay reads a segmenter folder (model.safetensors + config.json); here an untrained one."""
    import json

    import numpy as np
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    from rwkv_mm.vision.heads import VRWKVSegmenter

    backbone = timm.create_model(
        "vrwkv_fmnist", in_chans=1, num_classes=0, img_size=64
    )  # as train.py builds it
    model = VRWKVSegmenter(backbone, num_classes=11, channels=32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    labels = ["background", *FASHION_MNIST_CLASSES]
    config = {
        "architecture": "vrwkv_fmnist",
        "num_classes": 11,
        "channels": 32,
        "size": 64,
        "label_names": labels,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    seg = classify_tab.load_segmenter(tmp_path)
    assert seg is not None
    image, segments = seg.segment(Image.open(classify_tab.example_images()[0]))
    assert image.shape == (64, 64) and image.dtype.name == "uint8"
    assert {label for _, label in segments} <= set(labels[1:])
    assert all(mask.shape == (64, 64) and set(np.unique(mask)) <= {0.0, 1.0} for mask, _ in segments)
    assert classify_tab.load_segmenter(tmp_path / "missing") is None


def test_architecture_list_matches_timm():
    import timm

    import rwkv_mm.vision  # noqa: F401

    assert sorted(classify_tab.ARCHITECTURES) == sorted(timm.list_models("vrwkv*"))


def test_analytics_off_and_no_share_link(app):
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert app[0].startswith("http://127.0.0.1:")


@pytest.mark.slow
def test_cli_serves_the_page(tmp_path, chat_lm):
    """`python -m demos.app` (what `make demo` runs) serves the page; prints the time to the first page."""
    port = demo_support.free_port()
    cmd = [sys.executable, "-m", "demos.app", "--port", str(port), "--index-dir", str(tmp_path / "idx")]
    if chat_lm is not None:
        cmd += ["--lm", str(chat_lm)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = start + 120
        while True:
            assert proc.poll() is None, f"the app exited with {proc.returncode}:\n{proc.stdout.read()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    page = r.read().decode()
                break
            except OSError:
                assert time.perf_counter() < deadline, "the page was not served within 120 s"
                time.sleep(0.25)
        print(f"first page served {time.perf_counter() - start:.1f} s after `python -m demos.app`")
        assert "<html" in page.lower()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
