"""Classify tab: an uploaded image -> top-5 labels from a Vision-RWKV classifier (timm).

The default model is the bundled Fashion-MNIST VRWKV (`timm.create_model("vrwkv_fmnist", pretrained=True)`).
A user's own model is either a folder written by `python -m rwkv_mm.vision.train export` (model.safetensors
+ config.json naming the architecture and labels) or a checkpoint file of a registered `vrwkv*` architecture,
loaded through timm's `pretrained_cfg_overlay=dict(file=...)`.

The upload goes through the eval transform that timm builds from the model's pretrained cfg (input size,
interpolation, crop, mean / std), after a conversion to the cfg's channel count (greyscale for 1x28x28).
Fashion-MNIST items are light on a dark background; with "auto-invert" a greyscale model sees a photo with
a light background inverted.

An optional segmentation overlay appears when a scenes segmenter is bundled (rwkv_mm/assets/vrwkv-scenes).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
BUNDLED_MODEL = "vrwkv_fmnist"
SCENES_ASSET = "vrwkv-scenes"
TOP_K = 5
# timm.list_models("vrwkv*") after `import rwkv_mm.vision`, spelled out so that the page is built without
# importing timm (~6 s); tests/test_demo_app.py checks that the two agree
ARCHITECTURES = (
    "vrwkv_fmnist",
    "vrwkv_tiny",
    "vrwkv_small",
    "vrwkv_base",
    "vrwkv_large",
    "vrwkv6_tiny",
    "vrwkv6_small",
    "vrwkv6_base",
)
MAX_PIXELS = 4096 * 4096  # larger uploads are refused (and PIL's decompression-bomb guard stays on)


class UserInputError(ValueError):
    """Bad input from the page (shown to the user as a message, never a traceback)."""


@dataclass
class Classifier:
    """A loaded classifier and everything needed to feed it one image.

    Args:
        name: what the page shows (architecture and source).
        model: the timm model, in eval mode.
        transform: PIL image -> [C, H, W] float tensor (timm's eval transform for the model's cfg).
        labels: one name per output class.
        in_chans: channels the model takes (the PIL mode: 1 -> "L", else "RGB").
    """

    name: str
    model: torch.nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    labels: list[str]
    in_chans: int

    def predict(self, image: Image.Image, auto_invert: bool = True, k: int = TOP_K) -> dict[str, float]:
        """Top-`k` labels of `image` with their softmax probabilities, best first."""
        import torch

        x = self.transform(prepare(image, self.in_chans, auto_invert)).unsqueeze(0)  # (1, C, H, W)
        with torch.inference_mode():
            probs = self.model(x).float().softmax(-1)[0]
        top = probs.topk(min(k, probs.numel()))
        return {self.labels[i]: float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())}


def prepare(image: Image.Image, in_chans: int, auto_invert: bool = True) -> Image.Image:
    """The upload in the model's colour mode: EXIF rotation applied, transparency flattened on white,
    then "L" for one channel (inverted when `auto_invert` and its border is lighter than mid-grey) or
    "RGB"."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(flat, rgba)
    if in_chans != 1:
        return image.convert("RGB")
    grey = image.convert("L")
    if auto_invert and border_mean(grey) > 127:
        grey = ImageOps.invert(grey)
    return grey


def border_mean(grey: Image.Image) -> float:
    """Mean of the outermost pixel ring of a greyscale image (0-255): the background's brightness."""
    a = np.asarray(grey, dtype=np.float32)
    if a.shape[0] < 3 or a.shape[1] < 3:
        return float(a.mean())
    ring = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    return float(ring.mean())


def open_image(path: str | Path) -> Image.Image:
    """Decode an uploaded file fully, or raise UserInputError saying why it is not a usable image."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise UserInputError(
                    f"image is too large ({im.width}x{im.height}); at most {MAX_PIXELS} pixels"
                )
            im.load()
            return im.copy()
    except UserInputError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise UserInputError(f"could not read {Path(path).name} as an image: {e}") from None


def _labels(cfg: dict[str, Any], num_classes: int) -> list[str]:
    names = cfg.get("label_names")
    if names and len(names) == num_classes:
        return list(names)
    if num_classes == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            return [info.index_to_description(i) for i in range(num_classes)]
        except Exception as e:  # timm without its bundled class lists
            logger.warning("no ImageNet class names: %s", e)
    return [f"class {i}" for i in range(num_classes)]


def _finish(name: str, model: torch.nn.Module, cfg_overrides: dict[str, Any] | None = None) -> Classifier:
    import timm.data

    model.eval().requires_grad_(False)
    data_cfg = timm.data.resolve_data_config(dict(cfg_overrides or {}), model=model)
    transform = timm.data.create_transform(**data_cfg, is_training=False)
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {}, **(cfg_overrides or {}))
    labels = _labels(cfg, model.num_classes)
    return Classifier(name, model, transform, labels, int(data_cfg["input_size"][0]))


def load_classifier(architecture: str = "", checkpoint: str = "") -> Classifier:
    """The bundled Fashion-MNIST VRWKV (no checkpoint) or a user's VRWKV model.

    Args:
        architecture: a registered timm name (e.g. "vrwkv_tiny"); ignored for an exported folder, which
            names its own. Defaults to the bundled "vrwkv_fmnist".
        checkpoint: "" for the bundled weights; a folder with model.safetensors + config.json (as
            `rwkv_mm.vision.train export` writes); or a .pth / .safetensors file for `architecture`.

    Raises:
        UserInputError: the checkpoint is missing, or the model cannot be built from it.
    """
    import timm

    import rwkv_mm.vision  # noqa: F401  (registers vrwkv_* in timm)

    architecture = (architecture or BUNDLED_MODEL).strip()
    checkpoint = (checkpoint or "").strip()
    if not checkpoint:
        if architecture != BUNDLED_MODEL:
            raise UserInputError(f"{architecture} has no bundled weights: give a checkpoint path")
        return _finish(f"{BUNDLED_MODEL} (bundled)", timm.create_model(BUNDLED_MODEL, pretrained=True))
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise UserInputError(f"no checkpoint at {path}")
    try:
        if path.is_dir():
            config_file, weights = path / "config.json", path / "model.safetensors"
            if not (config_file.is_file() and weights.is_file()):
                raise UserInputError(f"{path} is a folder without config.json and model.safetensors")
            config = json.loads(config_file.read_text())
            arch = config["architecture"]
            model = timm.create_model(
                arch,
                pretrained=True,
                num_classes=config.get("num_classes", 1000),
                in_chans=config.get("input_size", [3])[0],
                pretrained_cfg_overlay=dict(file=str(weights)),
                **config.get("model_args", {}),
            )
            keys = ("label_names", "input_size", "mean", "std", "interpolation", "crop_pct")
            overrides = {k: config[k] for k in keys if config.get(k) is not None}
            if "input_size" in overrides:
                overrides["input_size"] = tuple(overrides["input_size"])
            return _finish(f"{arch} ({path})", model, overrides)
        if architecture not in timm.list_models("vrwkv*"):
            raise UserInputError(f"unknown architecture {architecture!r}; one of {', '.join(ARCHITECTURES)}")
        model = timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        return _finish(f"{architecture} ({path})", model)
    except UserInputError:
        raise
    except Exception as e:
        logger.exception("could not load %s from %s", architecture, path)
        raise UserInputError(f"could not load {architecture} from {path}: {type(e).__name__}: {e}") from None


MIN_SEGMENT = 0.005  # segments covering less of the image are not reported


@dataclass
class Segmenter:
    """The bundled scenes segmenter: a class for every pixel of a greyscale scene."""

    model: torch.nn.Module
    labels: list[str]  # background first
    size: int  # the scene side the model was trained on
    mean: float
    std: float

    def segment(self, image: Image.Image) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
        """(the scene as the model saw it: uint8 [size, size], [(mask float [size, size], label)] for each
        class found, largest first; the background and segments under `MIN_SEGMENT` of the image left out)
        - the value of a gr.AnnotatedImage."""
        import torch

        grey = prepare(image, 1).resize((self.size, self.size), Image.Resampling.BILINEAR)
        a = np.asarray(grey, dtype=np.float32) / 255.0
        x = torch.from_numpy((a - self.mean) / self.std)[None, None]  # (1, 1, S, S)
        with torch.inference_mode():
            classes = self.model(x).argmax(1)[0].numpy()  # (S, S)
        ids, counts = np.unique(classes, return_counts=True)
        found = [(n, c) for c, n in zip(ids, counts) if c > 0 and n >= MIN_SEGMENT * classes.size]
        segments = [
            ((classes == c).astype(np.float32), self.labels[c]) for _, c in sorted(found, reverse=True)
        ]
        return np.asarray(grey), segments


def load_segmenter(folder: str | Path | None = None) -> Segmenter | None:
    """The bundled scenes segmenter (or the one in `folder`), None when it is not there or unreadable.

    The folder holds model.safetensors (a VRWKVSegmenter state dict, as `rwkv_mm.vision.train --task seg`
    trains it: a one-channel backbone built with num_classes=0 and img_size=size) and config.json with
    "architecture" (the backbone), "num_classes", "label_names" (background first), and optionally
    "model_args", "indices", "channels" (the decoder width, --seg-channels), "size" (the scene side,
    default 128), "mean" and "std".
    """
    from rwkv_mm import assets

    folder = Path(folder) if folder is not None else assets.ROOT / SCENES_ASSET
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        return None
    try:
        import timm
        from safetensors.torch import load_file

        import rwkv_mm.vision  # noqa: F401
        from rwkv_mm.vision.heads import VRWKVSegmenter

        config = json.loads((folder / "config.json").read_text())
        size = int(config.get("size", 128))
        backbone = timm.create_model(
            config["architecture"], in_chans=1, num_classes=0, img_size=size, **config.get("model_args", {})
        )
        kwargs = {k: config[k] for k in ("indices", "channels") if k in config}
        model = VRWKVSegmenter(backbone, num_classes=config["num_classes"], **kwargs)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        model.eval().requires_grad_(False)
        labels = list(config.get("label_names") or [f"class {i}" for i in range(config["num_classes"])])
        mean, std = config.get("mean", [0.286])[0], config.get("std", [0.353])[0]
        return Segmenter(model, labels, size, mean, std)
    except Exception:
        logger.exception("the bundled segmenter in %s could not be loaded; the overlay stays hidden", folder)
        return None


class ClassifyBackend:
    """Models loaded on first use and shared by every session (inference only: nothing per user)."""

    def __init__(self, segmenter_dir: str | Path | None = None) -> None:
        """
        Args:
            segmenter_dir: the segmentation model's folder (see `load_segmenter`); None = the bundled
                rwkv_mm/assets/vrwkv-scenes. The overlay is offered only when it exists.
        """
        from rwkv_mm import assets

        self.segmenter_dir = Path(segmenter_dir) if segmenter_dir else assets.ROOT / SCENES_ASSET
        self._lock = threading.Lock()
        self._classifiers: dict[tuple[str, str], Classifier] = {}
        self._segmenter: Segmenter | None = None
        self._segmenter_loaded = False

    def classifier(self, architecture: str = "", checkpoint: str = "") -> Classifier:
        key = ((architecture or BUNDLED_MODEL).strip(), (checkpoint or "").strip())
        with self._lock:
            if key not in self._classifiers:
                if len(self._classifiers) >= 3:  # keep memory bounded: drop the oldest user model
                    self._classifiers.pop(next(iter(self._classifiers)))
                self._classifiers[key] = load_classifier(*key)
            return self._classifiers[key]

    def segmenter(self) -> Segmenter | None:
        with self._lock:
            if not self._segmenter_loaded:
                self._segmenter = load_segmenter(self.segmenter_dir)
                self._segmenter_loaded = True
            return self._segmenter

    def warm_up(self) -> None:
        """Load the bundled classifier now (imports timm) and run it once (builds its compiled kernel on
        first use), so that the first upload answers at once."""
        self.classifier().predict(Image.new("L", (28, 28)))

    def segmentation_available(self) -> bool:
        return (self.segmenter_dir / "config.json").is_file()

    def classify(
        self,
        image_path: str | None,
        architecture: str = "",
        checkpoint: str = "",
        auto_invert: bool = True,
        overlay: bool = False,
    ) -> tuple[dict[str, float], tuple | None, str]:
        """(top-5 {label: probability}, the segmentation (see `Segmenter.segment`) or None, a status line)."""
        if not image_path:
            raise UserInputError("upload an image first")
        image = open_image(image_path)
        clf = self.classifier(architecture, checkpoint)
        scores = clf.predict(image, auto_invert)
        best = next(iter(scores))
        status = f"{clf.name}: **{best}** ({scores[best]:.1%})"
        seg_image = None
        if overlay:
            seg = self.segmenter()
            if seg is None:
                status += " · no segmentation model is bundled"
            else:
                seg_image = seg.segment(image)
                status += " · segments: " + (", ".join(label for _, label in seg_image[1]) or "none")
        return scores, seg_image, status


def _payload_path(payload: Any) -> str | None:
    """The cached file of an image payload (the event runs with preprocess=False, see `build`)."""
    if payload is None:
        return None
    if isinstance(payload, dict):
        return payload.get("path")
    if isinstance(payload, str):
        return payload
    return getattr(payload, "path", None)


def example_images() -> list[Path]:
    """The bundled example PNGs (demos/examples/*.png), sorted."""
    return sorted(EXAMPLES_DIR.glob("*.png"))


# event functions take these as defaults: Gradio injects the tracker of the running event
PROGRESS = gr.Progress()


def build(backend: ClassifyBackend | None = None) -> ClassifyBackend:
    """Lay out the Classify tab inside the current gr.Blocks / gr.Tab context; return its backend."""
    backend = backend or ClassifyBackend()
    has_seg = backend.segmentation_available()
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(
                label="Image",
                type="filepath",
                sources=["upload", "clipboard"],
                height=280,
                elem_id="cls-image",
            )
            auto_invert = gr.Checkbox(
                value=True,
                label="Auto-invert light backgrounds (greyscale models expect a light item on dark)",
            )
            show_overlay = gr.Checkbox(value=has_seg, label="Segmentation overlay", visible=has_seg)
            with gr.Accordion("Your own model", open=False):
                architecture = gr.Dropdown(
                    choices=list(ARCHITECTURES),
                    value=BUNDLED_MODEL,
                    label="Architecture (ignored for an exported folder)",
                    allow_custom_value=True,
                )
                checkpoint = gr.Textbox(
                    label="Checkpoint path (.pth / .safetensors, or an exported folder); empty = bundled",
                    placeholder="e.g. ~/models/vrwkv_t_in1k_224.pth",
                    elem_id="cls-ckpt",
                )
            button = gr.Button("Classify", variant="primary", elem_id="cls-btn")
        with gr.Column(scale=1):
            labels = gr.Label(num_top_classes=TOP_K, label="Top-5", elem_id="cls-labels")
            seg_image = gr.AnnotatedImage(
                label="Segmentation", visible=has_seg, height=280, elem_id="cls-seg"
            )
            status = gr.Markdown(elem_id="cls-status")
    examples = [str(p) for p in example_images()]
    if examples:
        gr.Examples(
            examples=examples, inputs=[image], label="Fashion-MNIST test images", examples_per_page=10
        )
    scenes = [str(p) for p in sorted((EXAMPLES_DIR / "scenes").glob("*.png"))]
    if has_seg and scenes:
        gr.Examples(examples=scenes, inputs=[image], label="Scenes (for the segmentation overlay)")

    def run(payload, arch, ckpt, invert, overlay, progress=PROGRESS):
        progress(0, desc="loading the model")
        try:
            scores, seg, text = backend.classify(
                _payload_path(payload), arch, ckpt, bool(invert), bool(overlay)
            )
        except UserInputError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return scores, seg, text

    def run_on_change(payload, arch, ckpt, invert, overlay, progress=PROGRESS):
        if _payload_path(payload) is None:  # the image was cleared
            return None, None, ""
        return run(payload, arch, ckpt, invert, overlay, progress)

    # preprocess=False: the image arrives as its cached file, so a corrupt upload reaches `open_image`
    # (and a message) instead of failing inside gr.Image's own decoding
    inputs = [image, architecture, checkpoint, auto_invert, show_overlay]
    button.click(run, inputs, [labels, seg_image, status], api_name="classify", preprocess=False)
    # an upload or a click on an example classifies at once
    image.change(
        run_on_change, inputs, [labels, seg_image, status], api_visibility="private", preprocess=False
    )
    return backend
