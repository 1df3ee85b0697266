"""The wheel ships rwkv_mm/assets/ (package data), and the asset lookup finds bundled folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rwkv_mm import assets

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_every_asset_file(tmp_path):
    src = tmp_path / "src"
    # build from a copy so no build/ or egg-info lands in the checkout
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            "staging",
            "runs",
            ".carry",
            ".upstream",
            ".torch_extensions",
            ".hypothesis",
            ".ruff_cache",
            ".rwkv-embed",
        ),  # build outputs and local working folders (gitignored: a clean clone has none of them)
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("rwkv_mm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "rwkv_mm/" + p.relative_to(assets.ROOT.parent).as_posix()
        for p in assets.ROOT.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert "rwkv_mm/assets/tokenizers/rwkv_vocab_v20230424.txt" in expected
    # the kernel sources are built on the user's machine, so they must ship too
    package = assets.ROOT.parent
    expected |= {
        "rwkv_mm/" + p.relative_to(package).as_posix()
        for pattern in ("kernels/include/**/*.h", "kernels/csrc/*.cpp", "kernels/cuda/*", "lm/csrc/*.cpp")
        for p in package.glob(pattern)
    }
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_every_asset_folder_records_its_provenance():
    assert assets.names(), "no bundled assets"
    for name in assets.names():
        assert (assets.path(name) / "PROVENANCE.md").is_file(), f"{name} has no PROVENANCE.md"


def test_unknown_asset_names_the_ones_that_exist():
    with pytest.raises(FileNotFoundError, match=r"no bundled asset named 'nope'; available: .*tokenizers"):
        assets.path("nope")
