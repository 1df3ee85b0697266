"""The demo in a real headless browser: Playwright drives Debian's chromium (no Playwright browser download).

One test walks the three tabs as a person would: sends a chat message and watches the reply stream in,
runs a search over the repository's docs/ and sees a result row, uploads an image and sees its labels, and
takes a screenshot of each tab (into $RWKV_MM_SCREENSHOT_DIR, e.g. docs/screenshots, else a temporary
folder). Requests to anything but the local app are blocked and reported.

Skipped with the reason when Playwright or chromium is missing; RWKV_MM_REQUIRE_BROWSER=1 (set by .ci/run)
turns that skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests import demo_support
from tests.embed_helpers import HashEmbedder

REPO = Path(__file__).resolve().parent.parent
# gradio's queue calls pandas options that pandas 3 deprecates (harmless)
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
REQUIRE = os.environ.get("RWKV_MM_REQUIRE_BROWSER") == "1"
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 90_000  # one shared CPU: the first reply loads the model


def chromium_path() -> str | None:
    """Debian's chromium: $RWKV_MM_CHROMIUM, else `chromium` / `chromium-browser` on PATH."""
    for candidate in (os.environ.get("RWKV_MM_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


def missing() -> str | None:
    """Why the browser test cannot run here (None when it can)."""
    for module, hint in (
        ("gradio", "pip install -e '.[demo]'"),
        ("gradio_client", "pip install -e '.[demo]'"),
        ("playwright", "pip install playwright"),
    ):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed ({hint})"
    if chromium_path() is None:
        return "chromium is not installed (apt-get install -y chromium)"
    return None


def skip_or_fail(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"RWKV_MM_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    reason = missing()
    if reason:
        skip_or_fail(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory, browser):
    lm = None
    if not demo_support.bundled_lm_available():
        lm = demo_support.synthetic_lm(tmp_path_factory.mktemp("lm") / "synthetic-v7.safetensors")
    embedder = None if demo_support.bundled_embedder_available() else HashEmbedder(dim=64)
    with demo_support.running_app(tmp_path_factory.mktemp("demo"), lm=lm, embedder=embedder) as (url, _):
        yield url


@pytest.fixture
def screenshot_dir(tmp_path) -> Path:
    folder = Path(os.environ.get("RWKV_MM_SCREENSHOT_DIR") or tmp_path)
    folder = folder if folder.is_absolute() else REPO / folder
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# records the text length of the last bot message at every DOM change (shows that the reply streamed)
WATCH_REPLY = """() => {
    window.__replyLengths = [];
    const observer = new MutationObserver(() => {
        const bots = document.querySelectorAll('#chat-log .message.bot');
        if (bots.length) window.__replyLengths.push(bots[bots.length - 1].innerText.trim().length);
    });
    observer.observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def test_demo_in_a_browser(browser, app, screenshot_dir):
    host = urlparse(app).hostname
    blocked: list[str] = []
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)

    def only_local(route):
        if urlparse(route.request.url).hostname in (host, "localhost", "127.0.0.1"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    start = time.perf_counter()
    page.goto(app, wait_until="domcontentloaded")  # never "networkidle": Gradio keeps a stream open
    page.wait_for_selector("#chat-msg textarea")
    print(f"page ready in {time.perf_counter() - start:.1f} s")

    # chat: the reply streams in
    page.evaluate(WATCH_REPLY)
    page.fill("#chat-msg textarea", "Hello! What can you do?")
    page.click("#chat-send")
    page.wait_for_selector("#chat-log .message.user")
    bot = page.locator("#chat-log .message.bot").last
    bot.wait_for()
    page.wait_for_function(
        "() => { const b = document.querySelectorAll('#chat-log .message.bot');"
        " return b.length && b[b.length - 1].innerText.trim().length > 0; }"
    )
    page.wait_for_selector("#chat-log .pending", state="detached")
    page.wait_for_timeout(300)
    lengths = page.evaluate("window.__replyLengths")
    growing = sorted({n for n in lengths if n > 0})
    assert bot.inner_text().strip(), "no reply text"
    assert len(growing) >= 2, f"the reply did not stream (text lengths seen: {growing})"
    page.screenshot(path=str(screenshot_dir / "chat.png"))
    print(f"chat done at {time.perf_counter() - start:.1f} s")

    # search: the docs of this repository
    page.get_by_role("tab", name="Search").click()
    page.fill("#search-q textarea", "How do I start the demo app?")
    page.click("#search-btn")
    # a result row: its path cell names a markdown file of docs/
    page.wait_for_function(
        "() => [...document.querySelectorAll('#search-results [role=gridcell]')]"
        ".some(c => c.innerText.trim().endsWith('.md'))"
    )
    page.wait_for_timeout(300)
    page.screenshot(path=str(screenshot_dir / "search.png"))
    print(f"search done at {time.perf_counter() - start:.1f} s")

    # classify: upload an example image
    page.get_by_role("tab", name="Classify").click()
    from demos.classify_tab import example_images

    example = next(p for p in example_images() if "sneaker" in p.name)
    page.locator("#cls-image input[type=file]").set_input_files(str(example))
    page.wait_for_function("() => document.querySelector('#cls-labels')?.innerText.includes('Sneaker')")
    page.wait_for_timeout(300)
    page.screenshot(path=str(screenshot_dir / "classify.png"))
    print(f"classify done at {time.perf_counter() - start:.1f} s")

    page.close()
    assert not blocked, f"the page tried to reach outside the machine: {blocked}"
    assert not [e for e in errors if "favicon" not in e], f"console errors: {errors}"
