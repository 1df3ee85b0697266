"""The `rwkv` pip package (0.8.32), the numerical oracle of the LM tests, run in subprocesses.

The package picks its model class from environment variables at import (``RWKV_V7_ON``, ``RWKV_JIT_ON``,
``RWKV_CUDA_ON``), so each configuration runs in its own process: a runner script reads a job file
(``torch.save``) and writes its results to an output file.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_RWKV = importlib.util.find_spec("rwkv") is not None


def start(runner: str, job: object, folder: Path, v7: bool) -> tuple[subprocess.Popen, Path]:
    """Start `runner` (a script's source) on `job` in `folder`; returns the process and its output file.

    Fails (not skips) when the package is missing: the dev extra installs it.
    """
    if not HAS_RWKV:
        pytest.fail("the rwkv pip package (0.8.32) is needed: pip install -e '.[dev]'")
    script, job_file, out = folder / "runner.py", folder / "job.pt", folder / "out.pt"
    script.write_text(runner)
    torch.save(job, job_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_")}
    env.update(RWKV_CUDA_ON="0", RWKV_JIT_ON="0", OMP_NUM_THREADS="1")
    if v7:
        env["RWKV_V7_ON"] = "1"
    cmd = [sys.executable, str(script), str(job_file), str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), out


def finish(proc: subprocess.Popen, out: Path, timeout: float = 600) -> dict:
    """Wait for a process of `start` and load its results (the package's log in the failure message)."""
    log = proc.communicate(timeout=timeout)[0].decode(errors="replace")
    assert proc.returncode == 0, f"rwkv package failed:\n{log[-3000:]}"
    return torch.load(out, weights_only=False)


def run(runner: str, job: object, folder: Path, v7: bool) -> dict:
    """`start` and `finish` in one call."""
    return finish(*start(runner, job, folder, v7))
