"""Bounded load test of `sigma serve` on loopback: single-request vs micro-batched serving.

For each mode a fresh `sigma serve` subprocess is started on a free loopback port over the same
finished run (``max_batch_size=1`` for "single", the configured batch size for "batched"),
warmed up, and sent ``--requests`` POST /v1/recommend calls from ``--concurrency`` concurrent
httpx clients (known users in turn, a mix of task names and free instructions). Reported per
mode: requests/s, p50/p99 latency, 5xx and other non-200 counts, and the mean micro-batch size
read back from the service's own /metrics; then batched / single as ratios. Modes alternate
when ``--repeats`` > 1, so drift of a shared machine hits both alike.

    .venv/bin/python scripts/load_test.py --profile tiny --out runs/tiny --requests 300

The server only reads the run directory. Client and server share the machine's cores, so the
figures are for comparing the two modes with each other, not absolute capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

TASKS = [{"task": "JustForYou"}, {"task": "Longtail"}, {"task": "Discover"},
         {"instruction": "find potato chips"}, {"instruction": "something for the holidays"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_facts() -> dict[str, Any]:
    model, flags = platform.processor(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = m.group(1).strip() if m else model
        f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(f.group(1).split()) if f else set()
    except OSError:
        pass
    keep = sorted(x for x in flags if x.startswith(("avx512", "amx")) or x in ("avx2", "fma"))
    return {"cpu": model, "cores": os.cpu_count(), "flags": keep}


def start_server(args: argparse.Namespace, batch_size: int, log: Any) -> tuple[Any, str]:
    port = free_port()
    sets = [f"serving.service.max_batch_size={batch_size}",
            f"serving.service.max_wait_ms={args.max_wait_ms}",
            f"serving.service.max_concurrency={max(64, 2 * args.concurrency)}",
            "serving.service.reload_every_s=0"]
    cmd = [sys.executable, "-m", "sigmarec.cli", "serve", "-p", args.profile, "-o", args.out,
           "--host", "127.0.0.1", "--port", str(port)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    with httpx.Client(base_url=base, timeout=10) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"sigma serve exited with {proc.returncode}; see {log.name}")
            try:
                if c.get("/readyz").status_code == 200:
                    return proc, base
            except httpx.TransportError:
                pass
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"sigma serve not ready after {args.start_timeout}s; see {log.name}")


def stop_server(proc: Any) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bodies(users: list[str], n: int, k: int) -> list[dict[str, Any]]:
    return [{"user_id": users[i % len(users)], "k": k, **TASKS[i % len(TASKS)]}
            for i in range(n)]


async def fire(base: str, work: list[dict[str, Any]], concurrency: int
               ) -> tuple[float, list[float], list[int]]:
    latencies: list[float] = [0.0] * len(work)
    statuses: list[int] = [0] * len(work)
    next_i = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_i
        while next_i < len(work):
            i = next_i
            next_i += 1
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/recommend", json=work[i])
                statuses[i] = r.status_code
            except httpx.TransportError:
                statuses[i] = -1
            latencies[i] = time.perf_counter() - t0

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return wall, latencies, statuses


def batch_stats(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    out = {}
    for name in ("sigma_batch_size_sum", "sigma_batch_size_count"):
        m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def run_mode(args: argparse.Namespace, mode: str, users: list[str], log: Any
             ) -> dict[str, Any]:
    size = 1 if mode == "single" else args.batch_size
    proc, base = start_server(args, size, log)
    try:
        asyncio.run(fire(base, bodies(users, args.warmup, args.k), args.concurrency))
        before = batch_stats(base)
        wall, lat, status = asyncio.run(fire(base, bodies(users[::-1], args.requests, args.k),
                                             args.concurrency))
        after = batch_stats(base)
    finally:
        stop_server(proc)
    lat_ms = np.asarray(lat) * 1000
    st = np.asarray(status)
    calls = after["sigma_batch_size_count"] - before["sigma_batch_size_count"]
    fused = after["sigma_batch_size_sum"] - before["sigma_batch_size_sum"]
    return {"mode": mode, "max_batch_size": size, "requests": len(lat),
            "requests_per_s": round(len(lat) / wall, 2), "p50_ms": round(float(
                np.percentile(lat_ms, 50)), 1), "p99_ms": round(float(np.percentile(lat_ms, 99)),
                                                              1),
            "errors_5xx": int(((st >= 500) | (st < 0)).sum()), "non_200": int((st != 200).sum()),
            "mean_batch": round(fused / calls, 2) if calls else None, "wall_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--out", default="runs/tiny", help="a finished run directory")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16, help="max_batch_size when batched")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds per mode")
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if not (Path(args.out) / "training" / "model").is_dir():
        raise SystemExit(f"{args.out}: not a trained run (sigma run --profile {args.profile} "
                         f"--out {args.out})")
    users = pd.read_parquet(Path(args.out) / "data" / "users.parquet")["user_id"].astype(
        str).tolist()
    rows = []
    with tempfile.NamedTemporaryFile("w+", prefix="load_test_", suffix=".log",
                                     delete=False) as log:
        for rep in range(args.repeats):
            for mode in ("single", "batched"):
                row = run_mode(args, mode, users, log)
                row["round"] = rep + 1
                rows.append(row)
                print(json.dumps(row), flush=True)
    df = pd.DataFrame(rows)
    med = df.groupby("mode")[["requests_per_s", "p50_ms", "p99_ms"]].median()
    ratios = {"requests_per_s": round(float(med.loc["batched", "requests_per_s"])
                                      / float(med.loc["single", "requests_per_s"]), 2),
              "p50": round(float(med.loc["batched", "p50_ms"] / med.loc["single", "p50_ms"]), 2),
              "p99": round(float(med.loc["batched", "p99_ms"] / med.loc["single", "p99_ms"]), 2)}
    facts = {**cpu_facts(), "python": platform.python_version(),
             "concurrency": args.concurrency, "requests": args.requests,
             "max_wait_ms": args.max_wait_ms, "k": args.k, "server_log": log.name}
    cols = ["round", "mode", "max_batch_size", "requests", "requests_per_s", "p50_ms", "p99_ms",
            "errors_5xx", "non_200", "mean_batch"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"\nbatched / single (medians over rounds): {ratios}")
    print(json.dumps(facts))
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "rows": rows, "ratios": ratios},
                                        indent=2))


if __name__ == "__main__":
    main()
