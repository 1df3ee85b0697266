"""Write the Classify tab's example images from the Fashion-MNIST test split (see PROVENANCE.md).

    python -m demos.examples.make_examples [--data /usr/share/datasets/fashion-mnist]

- `<class>-<name>-test<index>.png`: the first test image of each class, 28x28, the dataset's own pixels;
- `scenes/scene-<n>.png`: 128x128 scenes of 2-4 test items (`FashionMNISTScenes`, seed 2026), for the
  segmentation overlay.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from PIL import Image

from rwkv_mm.vision.data import FASHION_MNIST_CLASSES, FashionMNISTScenes, load_fashion_mnist

logger = logging.getLogger(__name__)

OUT = Path(__file__).resolve().parent
SCENE_SEED = 2026
N_SCENES = 4


def slug(name: str) -> str:
    """A file-name-safe class name: "T-shirt/top" -> "t-shirt-top"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="folder with the idx files (default: Debian's)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    images, labels = load_fashion_mnist("test", args.data)
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        index = int((labels == c).nonzero()[0])
        path = args.out / f"{c}-{slug(name)}-test{index}.png"
        Image.fromarray(images[index].numpy(), mode="L").save(path, optimize=True)
        logger.info("%s: test image %d", path.name, index)
    scenes = FashionMNISTScenes(images, labels, length=N_SCENES, seed=SCENE_SEED)
    (args.out / "scenes").mkdir(exist_ok=True)
    for n in range(N_SCENES):
        canvas, _, placed = scenes.generate(n)
        path = args.out / "scenes" / f"scene-{n}.png"
        Image.fromarray((canvas * 255).round().byte().numpy(), mode="L").save(path, optimize=True)
        items = ", ".join(f"{FASHION_MNIST_CLASSES[p['cls']]} (test{p['source']})" for p in placed)
        logger.info("%s: %s", path.relative_to(args.out), items)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
