"""Language model: prefill and decode speed of rwkv_mm against the `rwkv` pip package, side by side.

A synthetic checkpoint of the RWKV-7 0.1B shape (12 layers, width 768, vocab 65536, LoRA 64/64/32/128,
official x070 format) is run by both implementations in fp32 on one thread: prefill of T tokens
(logits for the last position only) and single-token decode. The package runs in a subprocess
(RWKV_V7_ON=1 is read at its import) on the same file, and the two sides take turns, one timing each,
so that both see the same machine load. The same script measures the fp32 GEMM roofline (the best
large matmul) and counts the FLOPs a prefill needs, so prefill speed is also given as a fraction of
that roofline, and the memory bandwidth (the best read of a 512 MB fp32 array) with the bytes of
weights a decode step must read, so decode speed is also given as a fraction of that bound. Times are
the best of `--repeats`; on a shared box only ratios taken in one run mean anything.

Usage: ``python benchmarks/bench_lm.py [--tokens 1024] [--decode 32] [--repeats 3] [--threads 1]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_mm.lm.checkpoint import RWKVConfig, synthetic_state_dict  # noqa: E402
from rwkv_mm.lm.model import RWKVLM  # noqa: E402

CONFIG = RWKVConfig("v7", 12, 768, 65536, 3072, d_decay=64, d_aaa=64, d_mv=32, d_gate=128)

PIP_SERVER = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
from rwkv.model import RWKV
T, n_decode = int(sys.argv[3]), int(sys.argv[4])
model = RWKV(sys.argv[1], "cpu fp32")
tokens = torch.randint(0, 65536, (T,), generator=torch.Generator().manual_seed(0)).tolist()
out, state = model.forward(tokens, None)
print("READY", flush=True)
for cmd in sys.stdin:  # one timing per command, so that both sides alternate on the same machine load
    t0 = time.perf_counter()
    if cmd.strip() == "prefill":
        out, state = model.forward(tokens, None)
    else:
        st = [s.clone() for s in state]
        t0 = time.perf_counter()
        for i in range(n_decode):
            out, st = model.forward([tokens[i]], st)
    print(time.perf_counter() - t0, flush=True)
"""


def gemm_gflops(c: RWKVConfig, T: int, repeats: int = 5) -> float:
    """The fp32 GEMM roofline: best GFLOP/s over a 2048^3 matmul and the model's largest prefill GEMMs
    ([T, C] x [C, F] and [T, F] x [F, C])."""
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (T, c.n_embd, c.dim_ffn), (T, c.dim_ffn, c.n_embd)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best


def stream_gbps(repeats: int = 5, megabytes: int = 512) -> float:
    """The memory-bandwidth bound: best GB/s of one pass summing a large fp32 array (far beyond caches)."""
    a = torch.randn(megabytes * 2**20 // 4)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def decode_bytes(c: RWKVConfig, itemsize: int = 4) -> float:
    """Bytes of weights one decode step must read: every projection and LoRA matrix of every layer
    (layer 0 has no value-residual LoRA) and the head; the per-channel vectors are negligible."""
    C = c.n_embd
    lora = 2 * C * (c.d_decay + c.d_aaa + c.d_gate)
    per_layer = 4 * C * C + lora + 2 * C * c.dim_ffn
    return itemsize * (c.n_layer * per_layer + 2 * C * c.d_mv * (c.n_layer - 1) + C * c.vocab_size)


def prefill_flops(c: RWKVConfig, T: int) -> float:
    """FLOPs a prefill of T tokens needs with logits for the last position only: every projection
    (r, k, v, output, the four LoRAs, the channel mix) per token and layer, the WKV state update and
    read-out (~4 N² multiply-adds per head and token), and the head once."""
    C, N = c.n_embd, c.head_size
    lora = c.d_decay + c.d_aaa + c.d_gate + c.d_mv * (c.n_layer - 1) / c.n_layer
    per_token_layer = 4 * C * C + 2 * C * lora + 2 * C * c.dim_ffn + 4 * C * N
    return 2 * (T * c.n_layer * per_token_layer + C * c.vocab_size)


class Ours:
    """rwkv_mm in this process."""

    def __init__(self, path: Path, T: int, n_decode: int, dtype: torch.dtype = torch.float32):
        self.model = RWKVLM.from_file(path, dtype=dtype)
        self.tokens = torch.randint(0, CONFIG.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
        self.n_decode = n_decode
        with torch.inference_mode():
            _, self.state = self.model(self.tokens)

    @torch.inference_mode()
    def time(self, what: str) -> float:
        t0 = time.perf_counter()
        if what == "prefill":
            self.model(self.tokens)
        else:
            st = self.state
            for i in range(self.n_decode):
                _, st = self.model(self.tokens[:, i : i + 1], st)
        return time.perf_counter() - t0


class Package:
    """The rwkv pip package in a subprocess (RWKV_V7_ON=1 is read at its import), timing on request."""

    def __init__(self, path: Path, T: int, n_decode: int, threads: int):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_")}
        env.update(RWKV_V7_ON="1", RWKV_CUDA_ON="0", OMP_NUM_THREADS=str(threads))
        args = [str(path.with_suffix("")), str(threads), str(T), str(n_decode)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PIP_SERVER, *args],
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for line in self.proc.stdout:
            if line.startswith("READY"):
                return
        raise RuntimeError("the rwkv package failed to load the model")

    def time(self, what: str) -> float:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="prefill length T")
    parser.add_argument("--decode", type=int, default=32, help="decode steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rwkv7-0.1b-synthetic.pth"
        torch.save(synthetic_state_dict(CONFIG, seed=0), path)
        roofline = gemm_gflops(CONFIG, args.tokens)
        bandwidth = stream_gbps()
        sides = {
            "ours": Ours(path, args.tokens, args.decode),
            "ours_bf16": Ours(path, args.tokens, args.decode, torch.bfloat16),
            "pkg": Package(path, args.tokens, args.decode, args.threads),
        }
        best = {(side, what): float("inf") for side in sides for what in ("prefill", "decode")}
        for _ in range(args.repeats):
            for what in ("prefill", "decode"):
                for side, runner in sides.items():
                    best[side, what] = min(best[side, what], runner.time(what))
        sides["pkg"].close()
        roofline = max(roofline, gemm_gflops(CONFIG, args.tokens))  # the box is shared: best of both
        bandwidth = max(bandwidth, stream_gbps())
    ours = {"prefill_s": best["ours", "prefill"], "decode_s": best["ours", "decode"] / args.decode}
    ours_bf16 = {
        "prefill_s": best["ours_bf16", "prefill"],
        "decode_s": best["ours_bf16", "decode"] / args.decode,
    }
    pkg = {"prefill_s": best["pkg", "prefill"], "decode_s": best["pkg", "decode"] / args.decode}
    flops = prefill_flops(CONFIG, args.tokens)
    step_bytes = decode_bytes(CONFIG)

    print(f"RWKV-7 0.1B shape (L12 D768 V65536), fp32, {args.threads} thread(s), best of {args.repeats}")
    print(
        f"fp32 GEMM roofline (best large matmul): {roofline:.1f} GFLOP/s; "
        f"prefill T={args.tokens} needs {flops / 1e9:.1f} GFLOP"
    )
    print(
        f"memory bandwidth (best 512 MB read): {bandwidth:.1f} GB/s; an fp32 decode step reads "
        f"{step_bytes / 1e6:.0f} MB of weights: at most {bandwidth * 1e9 / step_bytes:.1f} tok/s"
    )
    print(f"{'':22s} {'rwkv_mm':>10s} {'rwkv pip':>10s} {'ratio':>7s}   (the package always in fp32)")
    T = args.tokens
    rows = [
        (f"prefill T={T} tok/s", T / ours["prefill_s"], T / pkg["prefill_s"]),
        ("decode tok/s", 1 / ours["decode_s"], 1 / pkg["decode_s"]),
        ("prefill % of roofline", *(100 * flops / s["prefill_s"] / 1e9 / roofline for s in (ours, pkg))),
        ("decode % of bandwidth", *(100 * step_bytes / s["decode_s"] / 1e9 / bandwidth for s in (ours, pkg))),
        (f"bf16 prefill T={T} tok/s", T / ours_bf16["prefill_s"], T / pkg["prefill_s"]),
        ("bf16 decode tok/s", 1 / ours_bf16["decode_s"], 1 / pkg["decode_s"]),
    ]
    for name, a, b in rows:
        print(f"{name:22s} {a:10.1f} {b:10.1f} {a / b:7.2f}")


if __name__ == "__main__":
    main()
