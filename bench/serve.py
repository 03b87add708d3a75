"""Is ``medtransfer serve`` as fast as ``predict`` on the same images, and is its memory flat?

1. Latency (p50/p99) and images/s of a real server process on 127.0.0.1 (dynamic batching, one inference worker)
   with 1, 8 and 32 concurrent clients, each client posting one PNG per request and waiting for its answer.
2. ``medtransfer predict``'s images/s on the same PNGs and checkpoint (batch 32). Target: serving at 32 clients
   >= 0.8x predict.
3. The memory of the server's processes (HTTP, inference worker, LitServe's manager) sampled over 5,000
   requests: summed RSS, and summed USS (RSS counts the pages the forked HTTP process shares with the main one
   twice). Target: the last USS sample within 10 % of the first one after warm-up.

Images are PneumoniaMNIST test images written as PNG (real X-rays); the model is EfficientNet-Lite0 (offline
ImageNet weights) for ``--size`` px input, as in ``bench/predict.py``.
Usage: python bench/serve.py [--size 224] [--requests_per_level 512] [--clients '[1, 8, 32]'] [--memory_requests 5000]
       [--max_batch_size 32] [--out bench/results/serve.json]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from predict import predict_throughput, write_checkpoint, write_pngs  # bench/predict.py
from servers import serve_process

REPO = Path(__file__).resolve().parents[1]


def _client_run(url: str, bodies: list[bytes], clients: int, count: int) -> dict:
    """``count`` requests from ``clients`` threads (a session each): latency percentiles and images/s."""
    sessions = [requests.Session() for _ in range(clients)]

    def one(i: int) -> float:
        start = time.perf_counter()
        answer = sessions[i % clients].post(f"{url}/predict", data=bodies[i % len(bodies)], timeout=300,
                                            headers={"Content-Type": "image/png"})  # fmt: skip
        answer.raise_for_status()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(one, range(count)))
    seconds = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": count,
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2),
        "images_per_second": round(count / seconds, 1),
    }


def _server_memory_mb(pid: int) -> tuple[float, float]:
    """Summed RSS (pages shared between the forked processes counted in each) and USS (each process's own)."""
    main = psutil.Process(pid)
    infos = [p.memory_full_info() for p in [main, *main.children(recursive=True)]]
    return round(sum(i.rss for i in infos) / 2**20, 1), round(sum(i.uss for i in infos) / 2**20, 1)


def serve_benchmark(
    size: int = 224,
    requests_per_level: int = 512,
    clients: tuple[int, ...] = (1, 8, 32),
    memory_requests: int = 5000,
    max_batch_size: int = 32,
    out: Path = REPO / "bench" / "results" / "serve.json",
) -> dict:
    """Measure the server at each client count, ``predict`` on the same images, and the server's RSS; store all.

    Args:
        size: the model's input size in pixels.
        requests_per_level: requests sent at each client count (after a warm-up of 32).
        clients: the concurrent client counts.
        memory_requests: requests (8 clients) over which the server's RSS is sampled.
        max_batch_size: the server's ``--max_batch_size``.
        out: where the results go.
    """
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_pngs(tmp / "images", 256)
        bodies = [path.read_bytes() for path in paths]
        checkpoint = tmp / "model.ckpt"
        write_checkpoint(checkpoint, size)
        predict_ips = predict_throughput(tmp / "images", checkpoint, tmp / "predictions.csv")
        args = [str(checkpoint), "--max_batch_size", str(max_batch_size), "--batch_timeout", "0.01",
                "--log_level", "warning"]  # fmt: skip
        with serve_process(*args, cwd=tmp) as (url, process):
            _client_run(url, bodies, 8, 32)  # warm-up
            levels = [_client_run(url, bodies, n, requests_per_level) for n in clients]
            samples = []
            step = max(1, memory_requests // 10)
            for done in range(0, memory_requests, step):
                _client_run(url, bodies, 8, min(step, memory_requests - done))
                samples.append(_server_memory_mb(process.pid))
    best = max(level["images_per_second"] for level in levels)
    result = {
        "hardware": f"{os.cpu_count()}-core {platform.machine()} CPU (torch threads {torch.get_num_threads()})",
        "model": f"tf_efficientnet_lite0, {size} px, one inference worker, --max_batch_size {max_batch_size}",
        "serve": levels,
        "predict_images_per_second": round(predict_ips, 1),
        "best_serve_over_predict": round(best / predict_ips, 3),
        "memory": {
            "requests": memory_requests,
            "rss_mb_every_tenth": [rss for rss, _ in samples],
            "uss_mb_every_tenth": [uss for _, uss in samples],
            "uss_growth_first_to_last": round(samples[-1][1] / samples[0][1] - 1, 4),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"predict: {result['predict_images_per_second']} images/s")
    print(f"{'clients':>8} {'p50 ms':>9} {'p99 ms':>9} {'images/s':>9}")
    for level in levels:
        print(f"{level['clients']:>8} {level['p50_ms']:>9} {level['p99_ms']:>9} {level['images_per_second']:>9}")
    print(f"best serve / predict: {result['best_serve_over_predict']}; USS (MB) over {memory_requests} requests: "
          f"{samples[0][1]} -> {samples[-1][1]}")  # fmt: skip
    return result


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(serve_benchmark, as_positional=False)
