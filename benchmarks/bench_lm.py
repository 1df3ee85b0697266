"""Language model: prefill and decode speed of rwkv_mm against the `rwkv` pip package, side by side.

A synthetic checkpoint of the RWKV-7 0.1B shape (12 layers, width 768, vocab 65536, LoRA 64/64/32/128,
official x070 format) is run by both implementations in fp32 on one thread: prefill of T tokens
(logits for the last position only) and single-token decode. The package runs in a subprocess
(RWKV_V7_ON=1 is read at its import) on the same file, and the sides take turns, one timing each,
so that all see the same machine load. rwkv_mm also decodes with int8 and bf16 weights
(`rwkv_mm.lm.quant.quantize_`), with fp32 weights and a bf16 head, as a bf16 model (bf16 activations
too), and 16 sequences at a time (aggregate tokens/s); every row's ratio is against the package's
fp32. The same script measures the fp32 GEMM roofline (the best large torch matmul) and counts the
FLOPs a prefill or a batched decode step needs, so those speeds are also given as a fraction of that
roofline, and the memory bandwidth (the best read of a 512 MB fp32 array) with the bytes of weights
a decode step must read, so decode speeds are also given as a fraction of that bound. Times are the
best of `--repeats`; on a shared box only ratios taken in one run mean anything.

Usage:
    python benchmarks/bench_lm.py [--tokens 1024] [--decode 32] [--batch 16] [--repeats 3] [--threads 1]
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
from rwkv_mm.lm.quant import quantize_  # noqa: E402

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


def decode_bytes(c: RWKVConfig, itemsize: int = 4, head_itemsize: int | None = None) -> float:
    """Bytes of weights one decode step must read: every projection and LoRA matrix of every layer
    (layer 0 has no value-residual LoRA) and the head; the per-channel vectors are negligible."""
    C = c.n_embd
    lora = 2 * C * (c.d_decay + c.d_aaa + c.d_gate)
    per_layer = 4 * C * C + lora + 2 * C * c.dim_ffn
    body = itemsize * (c.n_layer * per_layer + 2 * C * c.d_mv * (c.n_layer - 1))
    return body + (itemsize if head_itemsize is None else head_itemsize) * C * c.vocab_size


def decode_flops(c: RWKVConfig) -> float:
    """FLOPs of one decode token: a multiply-add per weight read (`decode_bytes`) and the WKV step."""
    return 2 * (decode_bytes(c, 1) + c.n_layer * 4 * c.n_embd * c.head_size)


def prefill_flops(c: RWKVConfig, T: int) -> float:
    """FLOPs a prefill of T tokens needs with logits for the last position only: every projection
    (r, k, v, output, the four LoRAs, the channel mix) per token and layer, the WKV state update and
    read-out (~4 N² multiply-adds per head and token), and the head once."""
    C, N = c.n_embd, c.head_size
    lora = c.d_decay + c.d_aaa + c.d_gate + c.d_mv * (c.n_layer - 1) / c.n_layer
    per_token_layer = 4 * C * C + 2 * C * lora + 2 * C * c.dim_ffn + 4 * C * N
    return 2 * (T * c.n_layer * per_token_layer + C * c.vocab_size)


class Ours:
    """rwkv_mm in this process: a model as loaded (fp32 or bf16), or with quantized weights, decoding
    `batch` sequences at a time."""

    def __init__(
        self,
        path: Path,
        T: int,
        n_decode: int,
        dtype: torch.dtype = torch.float32,
        quant: str | None = None,
        head: str | None = None,
        batch: int = 1,
        model: RWKVLM | None = None,
    ):
        self.model = model if model is not None else RWKVLM.from_file(path, dtype=dtype)
        if quant:
            quantize_(self.model, quant, head)
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, CONFIG.vocab_size, (batch, T), generator=g)
        self.n_decode = n_decode
        with torch.inference_mode():  # the decode state: after T tokens (16 for a batch)
            _, self.state = self.model(self.tokens if batch == 1 else self.tokens[:, :16])

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
    parser.add_argument("--batch", type=int, default=16, help="sequences of the batched decode row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    T = args.tokens
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rwkv7-0.1b-synthetic.pth"
        torch.save(synthetic_state_dict(CONFIG, seed=0), path)
        roofline = gemm_gflops(CONFIG, T)
        bandwidth = stream_gbps()
        ours = Ours(path, T, args.decode)
        sides = {  # name -> (runner, what it times)
            "ours": (ours, ("prefill", "decode")),
            "ours_bf16": (Ours(path, T, args.decode, torch.bfloat16), ("prefill", "decode")),
            "int8": (Ours(path, T, args.decode, quant="int8"), ("decode",)),
            "bf16w": (Ours(path, T, args.decode, quant="bf16"), ("decode",)),
            "bf16head": (Ours(path, T, args.decode, quant="fp32", head="bf16"), ("decode",)),
            "batch": (Ours(path, T, args.decode, batch=args.batch, model=ours.model), ("decode",)),
            "pkg": (Package(path, T, args.decode, args.threads), ("prefill", "decode")),
        }
        best = {(side, what): float("inf") for side, (_, whats) in sides.items() for what in whats}
        for _ in range(args.repeats):
            for what in ("prefill", "decode"):
                for side, (runner, whats) in sides.items():
                    if what in whats:
                        best[side, what] = min(best[side, what], runner.time(what))
        sides["pkg"][0].close()
        roofline = max(roofline, gemm_gflops(CONFIG, T))  # the box is shared: best of both
        bandwidth = max(bandwidth, stream_gbps())
    prefill = {side: T / best[side, "prefill"] for side in ("ours", "ours_bf16", "pkg")}
    decode = {side: args.decode / best[side, "decode"] for side in sides}  # tokens/s of one sequence
    decode["batch"] *= args.batch  # aggregate
    flops = prefill_flops(CONFIG, T)
    step_bytes = {n: decode_bytes(CONFIG, size) for n, size in (("fp32", 4), ("bf16", 2), ("int8", 1))}
    step_bytes["fp32, bf16 head"] = decode_bytes(CONFIG, 4, 2)
    bound = {n: bandwidth * 1e9 / b for n, b in step_bytes.items()}  # tokens/s

    print(f"RWKV-7 0.1B shape (L12 D768 V65536), {args.threads} thread(s), best of {args.repeats}")
    print(
        f"fp32 GEMM roofline (best large matmul): {roofline:.1f} GFLOP/s; "
        f"prefill T={T} needs {flops / 1e9:.1f} GFLOP"
    )
    print(
        f"memory bandwidth (best 512 MB read): {bandwidth:.1f} GB/s; a decode step reads "
        + ", ".join(f"{b / 1e6:.0f} MB ({n}, at most {bound[n]:.1f} tok/s)" for n, b in step_bytes.items())
    )
    print(f"{'':26s} {'rwkv_mm':>10s} {'rwkv pip':>10s} {'ratio':>7s}   (the package always in fp32)")
    pkg_pct = 100 * decode["pkg"] / bound["fp32"]
    rows = [
        (f"prefill T={T} tok/s", prefill["ours"], prefill["pkg"]),
        ("decode tok/s", decode["ours"], decode["pkg"]),
        (
            "prefill % of roofline",
            *(100 * flops * p / T / 1e9 / roofline for p in (prefill["ours"], prefill["pkg"])),
        ),
        ("decode % of bandwidth", 100 * decode["ours"] / bound["fp32"], pkg_pct),
        (f"bf16 prefill T={T} tok/s", prefill["ours_bf16"], prefill["pkg"]),
        ("bf16 decode tok/s", decode["ours_bf16"], decode["pkg"]),
        ("int8-weight decode tok/s", decode["int8"], decode["pkg"]),
        ("  % of int8 bandwidth", 100 * decode["int8"] / bound["int8"], pkg_pct),
        ("bf16-weight decode tok/s", decode["bf16w"], decode["pkg"]),
        ("  % of bf16 bandwidth", 100 * decode["bf16w"] / bound["bf16"], pkg_pct),
        ("fp32, bf16-head decode", decode["bf16head"], decode["pkg"]),
        ("  % of its bandwidth", 100 * decode["bf16head"] / bound["fp32, bf16 head"], pkg_pct),
        (f"batch-{args.batch} decode tok/s", decode["batch"], decode["pkg"]),
    ]
    for name, a, b in rows:
        print(f"{name:26s} {a:10.1f} {b:10.1f} {a / b:7.2f}")
    batch_gflops = decode["batch"] * decode_flops(CONFIG) / 1e9
    print(
        f"batch-{args.batch} decode: {decode['batch'] / decode['ours']:.2f}x our one-sequence fp32 decode, "
        f"{batch_gflops:.1f} GFLOP/s = {100 * batch_gflops / roofline:.0f}% of the roofline"
    )


if __name__ == "__main__":
    main()
