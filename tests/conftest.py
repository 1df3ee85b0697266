"""Shared test setup: a pinned torch thread count (the CI box is small and shared)."""

import os

import torch

torch.set_num_threads(int(os.environ.get("RWKV_MM_TEST_THREADS", "1")))
