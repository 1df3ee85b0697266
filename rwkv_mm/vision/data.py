"""Image data for training and evaluating the vision models offline.

- Fashion-MNIST ("Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms",
  Xiao, Rasul and Vollgraf, 2017, https://arxiv.org/abs/1708.07747; https://github.com/zalandoresearch/
  fashion-mnist, MIT licence): 60000 + 10000 grey 28x28 images of 10 clothing classes, read from the
  idx(.gz) files that Debian's `dataset-fashion-mnist` package installs under
  /usr/share/datasets/fashion-mnist (or any folder holding the same four files).
- `FashionMNISTScenes`: a synthetic semantic-segmentation set made of Fashion-MNIST items pasted on a
  128x128 canvas, generated on the fly and deterministically from a seed.
- `image_folder`: torchvision's ImageFolder with timm's transforms, for users' own class-per-folder data.

The idx format (http://yann.lecun.com/exdb/mnist/): a big-endian header - two zero bytes, a type code
(0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions,
then one uint32 per dimension - followed by the data in C order.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "SCENE_CLASSES",
    "FashionMNIST",
    "FashionMNISTScenes",
    "fashion_mnist_transform",
    "image_folder",
    "load_fashion_mnist",
    "read_idx",
    "write_idx",
]

logger = logging.getLogger(__name__)

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# environment variable naming another folder with the four idx files
FASHION_MNIST_ENV = "RWKV_MM_FASHION_MNIST"
APT_HINT = "apt-get install dataset-fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# statistics of the 60000 training images, pixels scaled to [0, 1]
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
SCENE_CLASSES = ("background", *FASHION_MNIST_CLASSES)

_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read one idx file (plain or gzip-compressed, by the `.gz` suffix) into a tensor.

    Args:
        path: the file.

    Returns:
        A tensor of the file's shape; uint8 data stay uint8, the other types become their native
        (little-endian) torch dtype.

    Raises:
        ValueError: the header is not an idx header, or the data are shorter or longer than it says.
    """
    path = Path(path)
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (header {data[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes), got {len(data) - offset} bytes")
    array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: str | os.PathLike, tensor: torch.Tensor | np.ndarray) -> None:
    """Write a tensor as an idx file (gzip-compressed when the name ends in `.gz`); `read_idx`'s inverse."""
    array = np.asarray(tensor)
    codes = {v.newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"idx has no type code for {array.dtype}; expected one of {sorted(map(str, codes))}")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(_IDX_DTYPES[code], copy=False).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder to read Fashion-MNIST from: `root`, else $RWKV_MM_FASHION_MNIST, else Debian's."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_DIR)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {root / (stem + '.gz')} not found (nor {stem} uncompressed); install the "
        f"data with `{APT_HINT}` (files under {DEFAULT_FASHION_MNIST_DIR}) or pass the folder holding the "
        "idx files"
    )


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images and labels of one split, from the idx files.

    Args:
        split: "train" (60000 images) or "test" (10000).
        root: the folder with `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`. Defaults to
            $RWKV_MM_FASHION_MNIST, else /usr/share/datasets/fashion-mnist (`apt-get install
            dataset-fashion-mnist`).

    Returns:
        (images uint8 [N, 28, 28], labels int64 [N]); label i names `FASHION_MNIST_CLASSES[i]`.

    Raises:
        FileNotFoundError: a file is missing (the message names it and the apt command).
        ValueError: unknown split, or images and labels that do not match.
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(_SPLIT_PREFIX)}, got {split!r}")
    folder, prefix = fashion_mnist_dir(root), _SPLIT_PREFIX[split]
    images = read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte")).long()
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return images, labels


def fashion_mnist_transform(
    train: bool = False,
    mean: Sequence[float] = FASHION_MNIST_MEAN,
    std: Sequence[float] = FASHION_MNIST_STD,
    pad: int = 2,
    flip: bool = True,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The transform of the bundled model: uint8 [H, W] -> normalised float [1, H, W].

    Args:
        train: add the training augmentation: random crop of the image zero-padded by `pad`, and a
            random horizontal flip (clothes stay clothes when mirrored).
        mean: per-channel mean of [0, 1] pixels.
        std: per-channel std.
        pad: padding of the random crop.
        flip: random horizontal flip (train only).

    Returns:
        A callable; its randomness comes from torch's global generator.
    """
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def transform(img: torch.Tensor) -> torch.Tensor:
        x = img.to(torch.float32).div_(255.0)
        if x.ndim == 2:
            x = x.unsqueeze(0)
        if train:
            H, W = x.shape[-2:]
            if pad > 0:
                i, j = torch.randint(0, 2 * pad + 1, (2,)).tolist()
                x = F.pad(x, (pad, pad, pad, pad))[:, i : i + H, j : j + W]
            if flip and torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - mean_t) / std_t

    return transform


class FashionMNIST(Dataset):
    """Fashion-MNIST as a map-style dataset of (image [1, 28, 28] float, label int).

    Args:
        split: "train" or "test".
        root: folder with the idx files (see `load_fashion_mnist`). Defaults to Debian's location.
        transform: uint8 [28, 28] -> tensor; defaults to `fashion_mnist_transform(train=split == "train")`.
        limit: keep only the first `limit` images (quick runs).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        limit: int | None = None,
    ):
        self.split = split
        self.images, self.targets = load_fashion_mnist(split, root)
        if limit is not None:
            self.images, self.targets = self.images[:limit], self.targets[:limit]
        self.transform = transform or fashion_mnist_transform(train=split == "train")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.targets[index])


class FashionMNISTScenes(Dataset):
    """Synthetic segmentation scenes: 2-4 Fashion-MNIST items pasted on a blank canvas.

    Item n of a scene is a source image resized to a random side in `item_size`, placed at a random
    position (it may leave the canvas or cover earlier items); its pixels brighter than `threshold`
    (on the 0-255 scale) are pasted and labelled with its class + 1. Everything else is background
    (label 0) with faint uniform noise. Scene `i` depends only on (seed, i): the same on every run,
    in every DataLoader worker and under any sampler.

    Args:
        images: uint8 [N, 28, 28] source items (e.g. `load_fashion_mnist("train")[0]`).
        labels: int64 [N] their classes, in [0, 10).
        length: number of scenes.
        seed: generation seed.
        size: canvas side in pixels.
        items: (min, max) items per scene, inclusive.
        item_size: (min, max) side of a pasted item, inclusive.
        threshold: pixel value above which an item pixel belongs to the item.
        noise: amplitude of the background noise in [0, 1] units.
        mean: normalisation mean of the returned image.
        std: normalisation std.

    Items are `(image [1, size, size] float (normalised), mask [size, size] int64)` with mask values in
    [0, 11): 0 = background, c + 1 = `FASHION_MNIST_CLASSES[c]` (names in `SCENE_CLASSES`).
    """

    classes = SCENE_CLASSES
    ignore_index = -100

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        length: int = 10000,
        seed: int = 0,
        size: int = 128,
        items: tuple[int, int] = (2, 4),
        item_size: tuple[int, int] = (28, 56),
        threshold: int = 24,
        noise: float = 0.08,
        mean: Sequence[float] = FASHION_MNIST_MEAN,
        std: Sequence[float] = FASHION_MNIST_STD,
    ):
        if images.ndim != 3 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected images [N, H, W] and labels [N], got {tuple(images.shape)} and "
                f"{tuple(labels.shape)}"
            )
        self.images, self.labels = images, labels.long()
        self.length, self.seed, self.size = length, seed, size
        self.items, self.item_size = items, item_size
        self.threshold, self.noise = threshold, noise
        self.mean, self.std = float(mean[0]), float(std[0])

    def __len__(self) -> int:
        return self.length

    def generate(self, index: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Scene `index` before normalisation.

        Returns:
            (image float [size, size] in [0, 1], mask int64 [size, size], the pasted items as dicts with
            source, cls, top, left, side - in paste order, later ones on top).
        """
        if not 0 <= index < self.length:
            raise IndexError(f"scene index {index} out of range [0, {self.length})")
        rng = np.random.default_rng([self.seed, index])
        S = self.size
        canvas = torch.from_numpy(rng.uniform(0.0, self.noise, (S, S)).astype(np.float32))
        mask = torch.zeros(S, S, dtype=torch.int64)
        placed = []
        for _ in range(int(rng.integers(self.items[0], self.items[1] + 1))):
            src = int(rng.integers(0, self.images.shape[0]))
            side = int(rng.integers(self.item_size[0], self.item_size[1] + 1))
            top, left = (int(v) for v in rng.integers(-side // 4, S - side + side // 4 + 1, size=2))
            item = self.images[src].to(torch.float32)[None, None]
            item = F.interpolate(item, size=(side, side), mode="bilinear", align_corners=False)[0, 0]
            # clip the item to the canvas
            t0, l0 = max(top, 0), max(left, 0)
            t1, l1 = min(top + side, S), min(left + side, S)
            if t1 <= t0 or l1 <= l0:
                continue
            patch = item[t0 - top : t1 - top, l0 - left : l1 - left]
            on = patch > self.threshold
            canvas[t0:t1, l0:l1][on] = patch[on] / 255.0
            cls = int(self.labels[src])
            mask[t0:t1, l0:l1][on] = cls + 1
            placed.append(dict(source=src, cls=cls, top=top, left=left, side=side))
        return canvas, mask, placed

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        canvas, mask, _ = self.generate(index)
        return ((canvas - self.mean) / self.std).unsqueeze(0), mask


class _FirstChannel:
    """[C, H, W] -> [1, H, W] (a class, not a lambda: DataLoader workers may pickle transforms)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x[:1]


def image_folder(
    root: str | os.PathLike,
    train: bool = False,
    input_size: tuple[int, int, int] = (3, 224, 224),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str = "bicubic",
    crop_pct: float | None = None,
):
    """A class-per-subfolder image dataset (torchvision's ImageFolder) with timm's transforms.

    Args:
        root: folder with one subfolder of images per class (the subfolder names are the classes, sorted).
        train: timm's training augmentation (random resized crop, flip) instead of resize + center crop.
        input_size: (channels, height, width) the model expects; 1 channel converts to greyscale.
        mean: normalisation mean; defaults to ImageNet's (or Fashion-MNIST's for 1 channel).
        std: normalisation std.
        interpolation: resize interpolation.
        crop_pct: eval center-crop fraction; timm's default when None.

    Returns:
        A `torchvision.datasets.ImageFolder` yielding (image [C, H, W] float, class index); its
        `classes` lists the class names.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    in_chans = input_size[0]
    if in_chans not in (1, 3):
        raise ValueError(f"input_size[0] must be 1 or 3 channels, got {in_chans}")
    default_mean, default_std = (
        (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        if in_chans == 1
        else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    )
    mean, std = tuple(mean or default_mean), tuple(std or default_std)
    tf = create_transform(
        input_size=input_size,
        is_training=train,
        mean=mean * 3 if in_chans == 1 else mean,  # timm's transforms work on RGB
        std=std * 3 if in_chans == 1 else std,
        interpolation=interpolation,
        crop_pct=crop_pct,
    )
    if in_chans == 1:  # grey -> 3 equal channels for timm's transforms -> keep one
        loader_tf = transforms.Compose([transforms.Grayscale(num_output_channels=3), tf, _FirstChannel()])
    else:
        loader_tf = tf
    dataset = ImageFolder(str(root), transform=loader_tf)
    logger.info("ImageFolder %s: %d images, %d classes", root, len(dataset), len(dataset.classes))
    return dataset
