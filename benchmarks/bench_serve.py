"""rwkv-serve under load: aggregate decode tokens/s with 1, 4 and 16 concurrent streaming clients, and
the time to first token of a follow-up chat turn with and without the prefix-state cache.

The server is `rwkv-serve` in a subprocess on 127.0.0.1 over the synthetic 0.1B-shaped x070 checkpoint
of bench_lm.py (12 layers, 768 wide, vocab 65536), fp32, 1 engine thread; clients are threads of this
process streaming through httpx. Aggregate throughput = completion tokens of all clients / wall time
of the round; the single-client row is the baseline the ratios use. Usage:
``python benchmarks/bench_serve.py [--tokens 48] [--clients 1 4 16]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_lm import CONFIG  # noqa: E402
from rwkv_mm.lm.checkpoint import synthetic_state_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Server:
    """`python -m rwkv_mm.serve` on a free port, until `close()`."""

    def __init__(self, model: Path, max_batch: int, cache_mb: int) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        args = ["--model", str(model), "--port", str(port), "--max-batch", str(max_batch),
                "--prefix-cache-mb", str(cache_mb), "--model-name", "bench"]  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, "-m", "rwkv_mm.serve", *args], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self.url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 300
        while True:
            try:
                httpx.get(f"{self.url}/models", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("rwkv-serve did not start") from None
                time.sleep(0.5)

    def stats(self) -> dict:
        return httpx.get(self.url.removesuffix("/v1") + "/stats", timeout=10).json()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def stream_chat(url: str, messages: list, max_tokens: int, seed: int) -> tuple[float, int]:
    """(seconds to the first content piece, completion tokens) of one streamed chat request."""
    body = {
        "model": "bench",
        "messages": messages,
        "stream": True,
        "max_tokens": max_tokens,
        "seed": seed,
        "temperature": 1.0,
        "top_p": 1.0,
        "stream_options": {"include_usage": True},
    }
    t0, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - t0), tokens


def throughput(url: str, clients: int, max_tokens: int) -> float:
    msgs = [[{"role": "user", "content": f"Tell me a story about the number {i}."}] for i in range(clients)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: stream_chat(url, msgs[i], max_tokens, i), range(clients)))
    return sum(tokens for _, tokens in results) / (time.perf_counter() - t0)


def follow_up_ttft(url: str) -> float:
    """TTFT of turn 4 of a conversation whose first three turns were served just before."""
    history = [{"role": "system", "content": "You are a patient teacher. " * 40}]
    for turn in range(3):
        history.append({"role": "user", "content": f"Question {turn}: " + "why is the sky blue? " * 20})
        stream_chat(url, history, 16, turn)
        history.append({"role": "assistant", "content": "Because of Rayleigh scattering. " * 10})
    history.append({"role": "user", "content": "Thank you. One more?"})
    return stream_chat(url, history, 4, 9)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=48, help="max_tokens per request")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rwkv7-0.1b-synthetic.safetensors"
        save_file(synthetic_state_dict(CONFIG, seed=0), str(path))
        server = Server(path, max_batch=max(args.clients), cache_mb=512)
        try:
            throughput(server.url, 1, 8)  # warm-up (kernel builds, allocator)
            rates = {n: throughput(server.url, n, args.tokens) for n in args.clients}
            ttft_cached = follow_up_ttft(server.url)
            stats = server.stats()["prefix_cache"]
        finally:
            server.close()
        uncached = Server(path, max_batch=1, cache_mb=0)
        try:
            ttft_uncached = follow_up_ttft(uncached.url)
        finally:
            uncached.close()

    base = rates[min(args.clients)]
    print(f"rwkv-serve, synthetic RWKV-7 0.1B shape, fp32, 1 engine thread, {args.tokens} tokens per request")
    print("| concurrent clients | aggregate tok/s | vs 1 client |")
    print("|---|---|---|")
    for n, rate in rates.items():
        print(f"| {n} | {rate:.1f} | {rate / base:.2f}x |")
    print(
        f"follow-up turn TTFT: {ttft_cached * 1e3:.0f} ms with the prefix cache, "
        f"{ttft_uncached * 1e3:.0f} ms without ({ttft_uncached / ttft_cached:.1f}x); "
        f"cache hit rate {stats['hit_rate']:.2f} ({stats['hits']}/{stats['lookups']}), "
        f"{stats['tokens_saved']} prompt tokens not recomputed"
    )


if __name__ == "__main__":
    main()
