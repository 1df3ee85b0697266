"""Vision data and training: idx reader, synthetic scenes, training steps, resumable checkpoints, DDP,
and the bundled Fashion-MNIST model."""

import gzip
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

import rwkv_mm.vision  # noqa: E402,F401  (registers the models)
from rwkv_mm import assets  # noqa: E402
from rwkv_mm.vision import train as T  # noqa: E402
from rwkv_mm.vision.data import (  # noqa: E402
    FASHION_MNIST_CLASSES,
    SCENE_CLASSES,
    FashionMNIST,
    FashionMNISTScenes,
    load_fashion_mnist,
    read_idx,
    write_idx,
)

REPO = Path(__file__).resolve().parents[1]
# a one-block, narrow vrwkv_fmnist: the registry's architecture at a test's cost
TINY = ["--model-kwargs", "depth=1", "embed_dim=32"]


def _fake_fmnist(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """Four idx.gz files like Fashion-MNIST's: class c is a bright bar at row band c (learnable)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c : 4 + 2 * c, 4:24] = 250
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def _train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data-dir", str(data_dir), "--output", str(out), "--batch-size", "16", "--epochs", "2",
        "--max-steps-per-epoch", "2", "--lr", "3e-3", "--warmup-epochs", "0", "--model-ema",
        "--no-progress", *TINY, *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------- idx reader
@pytest.mark.parametrize("suffix", ["", ".gz"], ids=["plain", "gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32], ids=lambda d: np.dtype(d).name)
def test_idx_roundtrip(tmp_path, suffix, dtype):
    a = (np.arange(2 * 3 * 5) * 7 % 251).astype(dtype).reshape(2, 3, 5)
    path = tmp_path / f"x-idx3-ubyte{suffix}"
    write_idx(path, a)
    t = read_idx(path)
    assert t.shape == (2, 3, 5)
    np.testing.assert_array_equal(t.numpy(), a)


def test_idx_header_is_big_endian(tmp_path):
    """Byte-exact file as the MNIST page describes it: magic 0x00000801, count 3 (big-endian), data."""
    path = tmp_path / "labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 9, 0, 4]))
    assert read_idx(path).tolist() == [9, 0, 4]


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="5 bytes"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_from_folder(tmp_path):
    root = _fake_fmnist(tmp_path / "fm", n_train=20, n_test=10)
    images, labels = load_fashion_mnist("train", root)
    assert images.shape == (20, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist()[:11] == [*range(10), 0]
    ds = FashionMNIST("test", root)
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3
    assert len(ds) == 10 and ds.classes == FASHION_MNIST_CLASSES and len(FASHION_MNIST_CLASSES) == 10


def test_fashion_mnist_missing_file_names_it_and_the_apt_package(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_fashion_mnist("train", tmp_path)
    assert "train-images-idx3-ubyte" in str(e.value)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", tmp_path)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_image_folder(tmp_path, in_chans):
    from PIL import Image

    from rwkv_mm.vision.data import image_folder

    rng = np.random.default_rng(0)
    for cls in ("boots", "shirts"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    ds = image_folder(tmp_path, train=False, input_size=(in_chans, 28, 28))
    x, y = ds[2]
    assert ds.classes == ["boots", "shirts"] and y == 1 and x.shape == (in_chans, 28, 28)


# ---------------------------------------------------------------- scenes
def _solid_items(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Fully bright 28x28 items, so an item's mask is its whole (clipped) square."""
    return torch.full((n, 28, 28), 255, dtype=torch.uint8), torch.arange(n) % 10


def test_scenes_labels_match_pasted_items():
    images, labels = _solid_items()
    ds = FashionMNISTScenes(images, labels, length=20, seed=3)
    for i in range(len(ds)):
        img, mask, placed = ds.generate(i)
        assert img.shape == mask.shape == (128, 128) and mask.dtype == torch.int64
        assert 2 <= len(placed) <= 4
        inside = torch.zeros(128, 128, dtype=torch.bool)
        for item in placed:
            sq = (slice(max(item["top"], 0), item["top"] + item["side"]),
                  slice(max(item["left"], 0), item["left"] + item["side"]))  # fmt: skip
            in_item = torch.zeros_like(inside)
            in_item[sq] = True
            # every pixel labelled with this class lies in some square of that class
            inside |= in_item & (mask == item["cls"] + 1)
        assert ((mask > 0) == inside).all()
        top = placed[-1]  # pasted last, so fully visible
        sq = (slice(max(top["top"], 0), top["top"] + top["side"]),
              slice(max(top["left"], 0), top["left"] + top["side"]))  # fmt: skip
        assert (mask[sq] == top["cls"] + 1).all() and torch.allclose(img[sq], torch.ones(()))
        # background: noise only, below any item pixel
        assert (img[mask == 0] <= ds.noise).all() and (img[mask > 0] > ds.threshold / 255).all()
        assert set(mask.unique().tolist()) <= {0} | {p["cls"] + 1 for p in placed}


def test_scenes_deterministic_and_normalised():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (30, 28, 28)).astype(np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, 30))
    a = FashionMNISTScenes(images, labels, length=8, seed=1)
    b = FashionMNISTScenes(images, labels, length=8, seed=1)
    c = FashionMNISTScenes(images, labels, length=8, seed=2)
    for i in (0, 5, 7, 5):  # any order
        xa, ma = a[i]
        xb, mb = b[i]
        assert torch.equal(xa, xb) and torch.equal(ma, mb)
        assert xa.shape == (1, 128, 128) and ma.shape == (128, 128)
    assert not torch.equal(a[0][1], c[0][1])
    assert a.classes == SCENE_CLASSES and len(SCENE_CLASSES) == 11
    with pytest.raises(IndexError):
        a[8]


# ---------------------------------------------------------------- training
def test_two_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = timm.create_model("vrwkv_fmnist", depth=1, embed_dim=32)
    args = T.build_parser().parse_args(["--output", "unused", "--lr", "1e-2", "--weight-decay", "0"])
    optimizer = T.build_optimizer(model, args)
    criterion, mixup = T.build_criterion(args, 10)
    assert mixup is None
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    losses = [T.train_step(model, x, y, criterion, optimizer, clip_grad=5.0) for _ in range(3)]
    assert losses[2] < losses[1] < losses[0], losses


def test_checkpoint_resume_continues_exactly(tmp_path):
    """Epoch 1, stop, `--resume` for epoch 2 == both epochs in one go (weights, EMA, optimizer)."""
    data = _fake_fmnist(tmp_path / "fm")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert T.main(_train_args(data, whole)) == 0
    assert T.main(_train_args(data, split, "--stop-epoch", "1")) == 0
    first = torch.load(split / "last.pt", weights_only=True)
    assert first["epoch"] == 0 and first["num_updates"] == 2
    assert set(first) >= {"model", "optimizer", "scheduler", "ema", "epoch", "rng", "args"}
    assert T.main(_train_args(data, split, "--resume")) == 0

    a = torch.load(whole / "last.pt", weights_only=True)
    b = torch.load(split / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1 and a["num_updates"] == b["num_updates"] == 4
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resuming"
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]
    assert first["model"].keys() == a["model"].keys()
    assert not torch.equal(first["model"]["head.weight"], a["model"]["head.weight"])  # it did train on

    rows = (split / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,lr,train_loss,eval_loss,eval_top1,ema_eval_top1")
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1"]
    assert (split / "best.pt").exists()


def test_export_writes_a_loadable_asset(tmp_path):
    data = _fake_fmnist(tmp_path / "fm")
    run, asset = tmp_path / "run", tmp_path / "asset"
    assert T.main(_train_args(data, run, "--epochs", "1")) == 0
    assert T.main(["export", "--checkpoint", str(run / "last.pt"), "--output", str(asset),
                   "--data-dir", str(data)]) == 0  # fmt: skip
    config = json.loads((asset / "config.json").read_text())
    assert config["architecture"] == "vrwkv_fmnist" and config["weights"] == "ema"
    assert config["model_args"] == {"depth": 1, "embed_dim": 32}
    assert config["input_size"] == [1, 28, 28] and config["label_names"] == list(FASHION_MNIST_CLASSES)
    assert np.array(config["confusion_matrix"]).sum() == 32
    provenance = (asset / "PROVENANCE.md").read_text()
    assert "MIT" in provenance and "dataset-fashion-mnist" in provenance
    assert (
        "python -m rwkv_mm.vision.train --data-dir" in provenance
        and f"{config['test_top1']:.2f} %" in provenance
    )
    model = timm.create_model("vrwkv_fmnist", pretrained=True, depth=1, embed_dim=32,
                              pretrained_cfg_overlay=dict(file=str(asset / "model.safetensors")))  # fmt: skip
    ema = torch.load(run / "last.pt", weights_only=True)["ema"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, ema[name]), name


def test_segmentation_smoke(tmp_path):
    """--task seg: VRWKVSegmenter on tiny scenes; mIoU in the metrics."""
    data = _fake_fmnist(tmp_path / "fm")
    out = tmp_path / "seg"
    args = _train_args(data, out, "--task", "seg", "--scene-size", "32", "--seg-channels", "8",
                       "--train-limit", "8", "--eval-limit", "4", "--batch-size", "4",
                       "--epochs", "1")  # fmt: skip
    args[args.index("depth=1")] = "depth=4"  # the segmenter takes four blocks
    assert T.main(args) == 0
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"eval_miou", "eval_pixel_acc", "ema_eval_miou"} <= set(header)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert any(k.startswith("decode_head.") for k in ckpt["model"])


def test_metrics_from_confusion():
    conf = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    assert T.metrics_from_confusion(conf, "cls")["top1"] == pytest.approx(100 * 5 / 6)
    seg = T.metrics_from_confusion(conf, "seg")  # class 2 absent: left out of the mean
    assert seg["miou"] == pytest.approx(100 * (3 / 4 + 2 / 3) / 2)


DDP_SCRIPT = textwrap.dedent(
    """
    import hashlib, os, sys
    from pathlib import Path
    import torch.distributed as dist
    from rwkv_mm.vision import train as T

    args = T.build_parser().parse_args(sys.argv[2:])
    out = T.train(args)
    h = hashlib.sha256()
    for p in out["model"].parameters():
        h.update(p.detach().double().numpy().tobytes())
    rank = os.environ["RANK"]
    Path(sys.argv[1], f"rank{rank}.txt").write_text(f"{h.hexdigest()} {out['history'][-1]['step']}")
    dist.destroy_process_group()
    """
)


def test_ddp_two_processes_gloo(tmp_path):
    """torchrun, 2 CPU processes on gloo: two steps on different shards leave identical replicas."""
    data = _fake_fmnist(tmp_path / "fm")
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    args = _train_args(data, out, "--epochs", "1", "--batch-size", "8", "--device", "cpu")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path), *args]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0, r1 = ((tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert r0 == r1, "replicas diverged"
    assert r0[1] == "2"
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["num_updates"] == 2
    h = hashlib.sha256()
    for v in ckpt["model"].values():  # parameters only (VRWKV has no buffers), in the model's order
        h.update(v.double().numpy().tobytes())
    assert h.hexdigest() == r0[0], "last.pt does not hold the trained replica"


# ---------------------------------------------------------------- bundled model
def test_fmnist_cfg_describes_preprocessing():
    model = timm.create_model("vrwkv_fmnist")
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (1, 28, 28) and cfg["num_classes"] == 10
    assert tuple(cfg["label_names"]) == FASHION_MNIST_CLASSES
    assert cfg["interpolation"] and len(cfg["mean"]) == len(cfg["std"]) == 1
    assert Path(cfg["file"]) == assets.ROOT / "vrwkv-fmnist" / "model.safetensors"
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (1, 28, 28)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_bundled_fmnist_model_loads():
    file = assets.ROOT / "vrwkv-fmnist" / "model.safetensors"
    from safetensors.torch import load_file

    model = timm.create_model("vrwkv_fmnist", pretrained=True).eval()
    stored = load_file(str(file))
    for name, value in model.state_dict().items():
        assert torch.equal(value, stored[name]), name
    assert file.stat().st_size <= 20 * 2**20
    assert (file.parent / "config.json").exists() and (file.parent / "PROVENANCE.md").exists()
    x = torch.zeros(1, 1, 28, 28)
    x[..., 2:26, 8:20] = 1.0  # a bright upright block, normalised like the data
    mean, std = model.pretrained_cfg["mean"][0], model.pretrained_cfg["std"][0]
    probs = model((x - mean) / std).softmax(-1)
    assert probs.shape == (1, 10) and torch.isfinite(probs).all()
