"""`planer serve` under load: the server runs in its own process, this process sends a bounded number of
requests over loopback at each concurrency and records throughput, latency percentiles and errors.

    python benchmarks/serve_load.py builds/tiny-x2 [--concurrency 1,4,16,64] [--requests 64] [--max-tokens 32]
                                   [--max-queue 32]

A concurrency above the server's --max-queue shows overload: the excess is answered 503 at once, and the
next level (and a final health check) shows the server kept serving.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from common import given_or_tiny, record, smoke_option


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build", type=Path, nargs="?")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--threads", type=int, default=2, help="engine threads of the server")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--max-queue", type=int, default=64, help="the server's limit of requests in flight")
    smoke_option(p)
    a = p.parse_args()
    if a.smoke:
        a.concurrency, a.requests, a.max_tokens = "1,2", 2, 2
    a.build = given_or_tiny(p, a.build, a.smoke, build=True)
    port = _free_port()
    server_cmd = [sys.executable, "-m", "planer", "serve", str(a.build), "--port", str(port), "--threads",
                  str(a.threads), "--max-batch", str(a.max_batch), "--max-delay-ms", str(a.max_delay_ms), "--max-queue", str(a.max_queue)]
    server = subprocess.Popen(server_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    rows = ["| concurrency | requests | answered 200 | 503 (busy) | other | requests/s | tokens/s | p50 ms | p99 ms "
            "| mean batch |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    data = []
    try:
        with httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(max_connections=256)) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.get("/healthz").raise_for_status()
                    break
                except httpx.HTTPError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"server did not start: {server.stderr.read()}")
                    time.sleep(0.2)
            prompts = [f"In {1800 + i} the city of " for i in range(a.requests)]

            def one(prompt: str) -> tuple[int, float]:
                t0 = time.perf_counter()
                r = client.post("/v1/generate", json={"prompt": prompt, "max_tokens": a.max_tokens})
                return r.status_code, (time.perf_counter() - t0) * 1e3

            one(prompts[0])  # warm-up
            for c in map(int, a.concurrency.split(",")):
                before = client.get("/metrics").text
                t0 = time.perf_counter()
                with ThreadPoolExecutor(c) as pool:
                    results = list(pool.map(one, prompts))
                wall = time.perf_counter() - t0
                after = client.get("/metrics").text
                ok = [ms for code, ms in results if code == 200]
                busy = sum(code == 503 for code, _ in results)
                other = len(results) - len(ok) - busy
                calls = _metric(after, "planer_batch_size_count") - _metric(before, "planer_batch_size_count")
                steps = _metric(after, "planer_batch_size_sum") - _metric(before, "planer_batch_size_sum")
                p50, p99 = np.percentile(ok, [50, 99]) if ok else (float("nan"),) * 2
                row = {"concurrency": c, "requests": len(results), "ok": len(ok), "busy": busy, "other": other,
                       "wall_s": wall,
                       "requests_per_s": len(ok) / wall, "tokens_per_s": len(ok) * a.max_tokens / wall,
                       "p50_ms": p50, "p99_ms": p99, "mean_batch": steps / calls if calls else 0.0}
                data.append(row)
                rows.append(f"| {c} | {len(results)} | {len(ok)} | {busy} | {other} | {row['requests_per_s']:.1f} | "
                            f"{row['tokens_per_s']:.0f} | {p50:.0f} | {p99:.0f} | {row['mean_batch']:.2f} |")
                print(rows[-1], flush=True)
            healthy = client.get("/healthz").status_code == 200
    finally:
        server.terminate()
        server.wait(30)
    text = (f"`planer serve {a.build}` ({a.threads} engine threads, max batch {a.max_batch}, max delay "
            f"{a.max_delay_ms} ms, max queue {a.max_queue}) in its own process; this process sends {a.requests} `/v1/generate` requests "
            f"of {a.max_tokens} greedy tokens at each concurrency over loopback. Latency is per request, "
            f"client-side, over the requests answered 200; requests/s and tokens/s count those too. "
            f"Health check after the last level: {'200' if healthy else 'FAILED'}.\n\n" + "\n".join(rows))
    record("serve_load", {"build": str(a.build), "server": server_cmd[1:], "levels": data,
                               "healthy_after": healthy}, text, smoke=a.smoke)


if __name__ == "__main__":
    main()
