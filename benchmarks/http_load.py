"""HTTP service under load: ``POST /v1/query`` from 8 concurrent clients on loopback.

Target (issue 6): requests/s and p50/p99 latency of ``/v1/query`` under 8 concurrent clients,
with zero errors, for a bounded number of requests.

The service (``spml_deploy.serving.http.serve``) runs in its own process on 127.0.0.1 and a free
port, serving an untrained tiny run (speed does not depend on training) deployed at
``--max-side`` pixels and a flat index over ``--index-images`` built-in scenes. The clients are
threads of this process, each with its own ``httpx.Client`` (keep-alive), sending a val scene
with a random point; every response must be 200 with k hits. Only loopback addresses are used.

    .venv/bin/python benchmarks/http_load.py [--requests 400] [--clients 8]
        [--out benchmarks/results/http_load.md]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from runs import make_run  # noqa: E402
from spml_deploy.serving.retrieval import build_index  # noqa: E402

from spml_deploy.artifacts import read_manifest, write_manifest  # noqa: E402
from spml_deploy.synth import SCENE_CLASSES, synthesize  # noqa: E402
from spml_deploy.sysinfo import cpu_name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(root: Path, max_side: int, n_images: int, size: int) -> tuple[Path, Path, Path]:
    run = make_run(root / "run", num_classes=len(SCENE_CLASSES))
    m = read_manifest(run)
    m.preprocess = dataclasses.replace(m.preprocess, max_side=max_side)
    m.classes = list(SCENE_CLASSES)
    write_manifest(run, m)
    synthesize(root / "data", n_train=n_images, n_val=8, size=size, seed=0)
    build_index(run, root / "data" / "images" / "train_*.png", root / "idx", progress=False)
    return run, root / "idx", root / "data" / "images"


def run_load(run: Path, idx: Path, images: Path, args, threads: int):
    """Start the service (torch ``threads``), send the requests, stop it."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    code = ("import logging; logging.basicConfig(level=logging.WARNING);"
            "from spml_deploy.serving.http import serve;"
            f"serve({str(run)!r}, {str(idx)!r}, host='127.0.0.1', port={port}, "
            f"log_level='warning', threads={threads})")
    server = subprocess.Popen([sys.executable, "-c", code], cwd=str(REPO))
    try:
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline:
            try:
                health = httpx.get(url + "/healthz", timeout=2).json()
                break
            except httpx.HTTPError:
                if server.poll() is not None:
                    raise SystemExit("the service exited during start-up")
                time.sleep(0.2)
        if health is None:
            raise SystemExit("the service did not start in 120 s")
        val = sorted(images.glob("val_*.png"))
        payloads = [p.read_bytes() for p in val]
        rng = np.random.default_rng(0)
        jobs = [(i % len(payloads), int(rng.integers(0, args.size)),
                 int(rng.integers(0, args.size))) for i in range(args.requests)]
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        next_job = [0]

        def client() -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                while True:
                    with lock:
                        if next_job[0] >= len(jobs):
                            return
                        j = jobs[next_job[0]]
                        next_job[0] += 1
                    t0 = time.perf_counter()
                    try:
                        r = c.post("/v1/query", files={"image": ("q.png", payloads[j[0]])},
                                   data={"point": f"{j[1]},{j[2]}", "k": str(args.k)})
                        ok = r.status_code == 200 and len(r.json()["hits"]) == args.k
                        why = f"HTTP {r.status_code}: {r.text[:200]}"
                    except httpx.HTTPError as exc:
                        ok, why = False, f"{type(exc).__name__}: {exc}"
                    dt_s = time.perf_counter() - t0
                    with lock:
                        latencies.append(dt_s)
                        if not ok:
                            errors.append(why)

        with httpx.Client(base_url=url, timeout=120) as c:       # warm-up, not counted
            for i in range(args.warmup):
                c.post("/v1/query", files={"image": ("q.png", payloads[i % len(payloads)])},
                       data={"point": "10,10", "k": str(args.k)}).raise_for_status()
        workers = [threading.Thread(target=client) for _ in range(args.clients)]
        t0 = time.perf_counter()
        for th in workers:
            th.start()
        for th in workers:
            th.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    return health, latencies, errors, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-side", type=int, default=128)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--index-images", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--threads", default="1,2",
                    help="torch intra-op threads of the service, one run per value")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/http_load.md")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="spml-http-load-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        run, idx, images = prepare(root, args.max_side, args.index_images, args.size)
        print(f"prepared run + index in {time.perf_counter() - t:.1f} s", flush=True)
        results = []
        for threads in [int(v) for v in args.threads.split(",")]:
            health, latencies, errors, wall = run_load(run, idx, images, args, threads)
            results.append((threads, np.asarray(latencies) * 1000, errors, wall))
            print(f"threads {threads}: {len(latencies) / wall:.1f} requests/s, "
                  f"{len(errors)} errors", flush=True)
    load_after = os.getloadavg()
    cmd = "python benchmarks/http_load.py " + " ".join(sys.argv[1:])
    lines = [
        "# HTTP service under load: POST /v1/query, concurrent clients on loopback",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {cpu_name()}, {len(os.sched_getaffinity(0))} CPUs available, Linux "
        f"{platform.release()}; Python {platform.python_version()}. Server and clients share the "
        f"machine. Date: {dt.date.today().isoformat()}. Load average before: "
        f"{' '.join(f'{v:.2f}' for v in load_before)}, after: "
        f"{' '.join(f'{v:.2f}' for v in load_after)} (shared machine: absolute numbers are noisy).",
        "",
        f"Service: `spml_deploy.serving.http.serve` (uvicorn, one process) on 127.0.0.1, torch "
        f"backend on the CPU, untrained tiny run deployed at max_side {args.max_side} (speed does "
        f"not depend on training), flat index of {health['index']['segments']:,} segments from "
        f"{health['index']['images']} scenes of {args.size}x{args.size} px. Each request: a "
        f"{args.size}x{args.size} PNG upload + a random point, k = {args.k} (network "
        f"{'twice: flip averaging, the index default' if health['index'].get('flip') else 'once'}"
        ", k-means segmentation of the query image, index search, store lookup). Model work is "
        f"serialised by the service's lock; {args.warmup} warm-up requests not counted. One service start "
        "per torch thread setting (`serve(threads=N)`).",
        "",
        "| clients | torch threads | requests | errors | wall s | requests/s | p50 ms | p90 ms "
        "| p99 ms | max ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    errors = []
    for threads, lat, errs, wall in results:
        errors += errs
        lines.append(f"| {args.clients} | {threads} | {lat.size} | {len(errs)} | {wall:.1f} | "
                     f"{lat.size / wall:.1f} | {np.percentile(lat, 50):.0f} | "
                     f"{np.percentile(lat, 90):.0f} | {np.percentile(lat, 99):.0f} | "
                     f"{lat.max():.0f} |")
    lines.append("")
    if errors:
        lines.append("Errors (first 5): " + "; ".join(errors[:5]))
        lines.append("")
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
