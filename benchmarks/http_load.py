"""HTTP service under load on loopback: ``POST /v1/query`` from concurrent clients, optionally
mixed with malformed and oversized requests, and the memory of worst-case requests.

Default mode: requests/s and p50/p99 latency of ``/v1/query`` under ``--clients`` concurrent
clients, with zero errors, for a bounded number of requests (``--requests``) and seconds
(``--seconds``). ``--bad-fraction F``: that share of the requests is malformed or oversized
(garbage bytes, a decompression-bomb header, a body over the upload limit, a fractional or
outside point, k over the limit, a missing image field) and must get its documented 4xx with
``{"detail", "fix"}``; the valid ones, among them ``--big`` images near the pixel limit, must
still be answered correctly. The service's resident memory is sampled throughout (peak growth
over the warmed-up service, against :func:`~spml_deploy.serving.http.request_memory_bytes`
x ``max_concurrent``).

``--memory``: peak memory of one request per pixel of its image, per image kind (RGB, RGBA,
16-bit, JPEG) and endpoint, each in a fresh process (the figures behind
``serving.http.WORST_BYTES_PER_PIXEL``).

The service (``spml_deploy.serving.http.serve``) runs in its own process on 127.0.0.1 and a free
port, serving an untrained tiny run (speed does not depend on training) deployed at
``--max-side`` pixels and a flat index over ``--index-images`` built-in scenes. The clients are
threads of this process, each with its own ``httpx.Client`` (keep-alive). Only loopback
addresses are used.

    .venv/bin/python benchmarks/http_load.py [--requests 400] [--clients 8] [--seconds 120]
        [--bad-fraction 0.5] [--big 0.1] [--memory] [--out benchmarks/results/http_load.md]

The helpers (server start, request mix, memory sampling) are used by tests/test_http_load.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from runs import make_run  # noqa: E402

from spml_deploy.artifacts import read_manifest, write_manifest  # noqa: E402
from spml_deploy.serving.ingest import build_index  # noqa: E402
from spml_deploy.data.synth import SCENE_CLASSES, synthesize  # noqa: E402
from spml_deploy.sysinfo import cpu_name  # noqa: E402

# bad request kinds -> the status the service must answer
BAD = {"garbage": 415, "bomb": 413, "oversized": 413, "fraction": 422, "outside": 422,
       "k_too_big": 422, "no_image": 422}


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


def proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status memory field (VmRSS, VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every ``interval`` seconds; ``peak`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.01):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = proc_status(pid, "VmRSS")
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, proc_status(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return
            time.sleep(self.interval)


def start_server(run: Path, idx: Path, threads: int = 1, **app_options: Any):
    """The service in its own process on 127.0.0.1 and a free port: (Popen, url, health)."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    code = ("import logging; logging.basicConfig(level=logging.WARNING);"
            "from spml_deploy.serving.http import serve;"
            f"serve({str(run)!r}, {str(idx)!r}, host='127.0.0.1', port={port}, "
            f"log_level='warning', threads={threads}, **{app_options!r})")
    server = subprocess.Popen([sys.executable, "-c", code], cwd=str(REPO))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            return server, url, httpx.get(url + "/healthz", timeout=2).json()
        except httpx.HTTPError:
            if server.poll() is not None:
                raise RuntimeError("the service exited during start-up")
            time.sleep(0.2)
    stop_server(server)
    raise RuntimeError("the service did not start in 180 s")


def stop_server(server) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def big_image(side: int) -> np.ndarray:
    """A smooth RGB image (compresses well: large in pixels, small as PNG)."""
    y, x = np.mgrid[0:side, 0:side]
    return np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], -1).astype(np.uint8)


def payloads(images: Path, max_pixels: int, max_upload: int, big_side: int | None) -> dict:
    """Request bodies: the val scenes, an optional big image, and the bad ones."""
    side = int(np.sqrt(max_pixels)) + 1
    out = {"val": [p.read_bytes() for p in sorted(images.glob("val_*.png"))],
           "garbage": b"\x00\x01 not an image" * 50,
           "bomb": _png(np.zeros((side, side), np.uint8)),       # header over the pixel limit
           "oversized": np.random.default_rng(0).bytes(max_upload + 1024)}
    if big_side:
        out["big"] = _png(big_image(big_side))
        assert len(out["big"]) < max_upload
    assert len(out["bomb"]) < max_upload
    return out


def mixed_jobs(n: int, bad_fraction: float, big_fraction: float, n_val: int, size: int,
               seed: int = 0) -> list[tuple[str, int, int, int]]:
    """(kind, val image, x, y) of ``n`` requests: ``query``, ``segment`` or ``big`` (valid) or
    one of :data:`BAD`."""
    rng = np.random.default_rng(seed)
    bad = sorted(BAD)
    jobs = []
    for i in range(n):
        u = rng.random()
        if u < bad_fraction:
            kind = bad[int(rng.integers(len(bad)))]
        elif u < bad_fraction + big_fraction:
            kind = "big"
        else:
            kind = "segment" if rng.random() < 0.2 else "query"
        jobs.append((kind, i % n_val, int(rng.integers(0, size)), int(rng.integers(0, size))))
    return jobs


def send(client, job: tuple[str, int, int, int], bodies: dict, k: int, max_k: int):
    """Send one request; returns (kind, status, json or None)."""
    kind, i, x, y = job
    image = ("q.png", bodies["big"] if kind == "big" else bodies["val"][i], "image/png")
    files: dict | None = {"image": image}
    data = {"point": f"{x},{y}", "k": str(k)}
    url = "/v1/query"
    if kind == "segment":
        url, data = "/v1/segment", {}
    elif kind in ("garbage", "bomb", "oversized"):
        files = {"image": ("q.png", bodies[kind], "image/png")}
    elif kind == "fraction":
        data["point"] = f"{x + 0.5},{y}"
    elif kind == "outside":
        data["point"] = f"{x},{10 ** 6}"
    elif kind == "k_too_big":
        data["k"] = str(max_k + 1)
    elif kind == "no_image":
        files = {"picture": image}
    r = client.post(url, files=files, data=data)
    try:
        body = r.json()
    except ValueError:
        body = None
    return kind, r.status_code, body


def check(kind: str, status: int, body: Any, k: int) -> str | None:
    """None if the answer is right (the documented status; k hits), else why not."""
    if kind in BAD:
        if status != BAD[kind]:
            return f"{kind}: HTTP {status}, expected {BAD[kind]}: {str(body)[:200]}"
        if not (isinstance(body, dict) and body.get("detail") and body.get("fix")):
            return f"{kind}: HTTP {status} without detail and fix: {str(body)[:200]}"
        return None
    if status != 200:
        return f"{kind}: HTTP {status}: {str(body)[:200]}"
    if kind == "segment":
        return None if body and body["classes"] else "segment: no classes"
    if len(body["hits"]) != k:
        return f"{kind}: {len(body['hits'])} hits, expected {k}"
    return None


def run_load(url: str, pid: int, jobs: list, bodies: dict, clients: int, k: int, max_k: int,
             seconds: float, expected_for=None) -> dict:
    """Send ``jobs`` from ``clients`` threads until done or ``seconds`` passed. Returns
    latencies of valid requests (s), counts, errors, wall time and the RSS peak / baseline.
    ``expected_for(job)``: the expected hit ids of a valid query job (or None)."""
    import httpx

    lock = threading.Lock()
    nxt = [0]
    out: dict[str, Any] = {"latencies": [], "bad_latencies": [], "errors": [], "sent": 0,
                           "bad": 0}
    deadline = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.monotonic() < deadline:
                with lock:
                    if nxt[0] >= len(jobs):
                        return
                    job = jobs[nxt[0]]
                    nxt[0] += 1
                t0 = time.perf_counter()
                try:
                    kind, status, body = send(c, job, bodies, k, max_k)
                    why = check(kind, status, body, k)
                    if why is None and expected_for is not None and kind in ("query", "big"):
                        want = expected_for(job)
                        got = [h["segment_id"] for h in body["hits"]]
                        if want is not None and got != want:
                            why = (f"{kind}: hits {got[:4]}... differ from the library's "
                                   f"{want[:4]}...")
                except httpx.HTTPError as exc:
                    why = f"{job[0]}: {type(exc).__name__}: {exc}"
                dt_s = time.perf_counter() - t0
                with lock:
                    out["sent"] += 1
                    if job[0] in BAD:
                        out["bad"] += 1
                        out["bad_latencies"].append(dt_s)
                    else:
                        out["latencies"].append(dt_s)
                    if why is not None:
                        out["errors"].append(why)

    base = proc_status(pid, "VmRSS")
    sampler = RssSampler(pid)
    sampler.start()
    workers = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for th in workers:
        th.start()
    for th in workers:
        th.join()
    out["wall"] = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    out["rss_base"], out["rss_peak"] = base, sampler.peak
    return out


# --------------------------------------------------------------------------------------------
# memory per pixel of one request


_MEMORY_CHILD = r'''
import sys
import numpy as np, torch
torch.set_num_threads(1)
def status(key):
    for ln in open("/proc/self/status"):
        if ln.startswith(key + ":"): return int(ln.split()[1]) * 1024
run, idx, endpoint, image, mask = sys.argv[1:6]
from spml_deploy.serving.http import Service, decode_upload, mask_from_rgb
svc = Service(run, idx)
small = np.zeros((64, 64, 3), np.uint8)
svc.segment(small); svc.query(small, "1,1", None, None, 10, None)      # warm-up
data = open(image, "rb").read()
mdata = open(mask, "rb").read() if mask != "-" else None
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")                          # reset VmHWM
arr = decode_upload(data, 10 ** 9)
if endpoint == "segment":
    out = svc.segment(arr)
elif mdata is not None:
    out = svc.query(arr, None, None, mask_from_rgb(decode_upload(mdata, 10 ** 9, "mask")), 10, None)
else:
    out = svc.query(arr, "10,10", None, None, 10, None)
print(status("VmHWM") - base)
'''


def memory_table(run: Path, idx: Path, root: Path, side: int) -> list[str]:
    """Peak memory growth of one request per pixel, per image kind and endpoint."""
    import cv2
    from PIL import Image

    rgb = big_image(side)
    files = {}
    Image.fromarray(rgb).save(root / "rgb.png", compress_level=1)
    files["RGB PNG"] = root / "rgb.png"
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(root / "rgba.png", compress_level=1)
    files["RGBA PNG"] = root / "rgba.png"
    cv2.imwrite(str(root / "rgb16.png"), (rgb.astype(np.uint16) * 257)[..., ::-1])
    files["16-bit RGB PNG"] = root / "rgb16.png"
    Image.fromarray(rgb).save(root / "rgb.jpg", quality=90)
    files["JPEG"] = root / "rgb.jpg"
    Image.fromarray(np.full((side, side, 3), 255, np.uint8)).save(root / "white.png")
    cases = [("segment", k, f, "-") for k, f in files.items()]
    cases += [("query (point)", k, f, "-") for k, f in files.items()]
    cases += [("query (mask, RGB)", "RGB PNG", files["RGB PNG"], root / "white.png"),
              ("query (mask, RGBA)", "RGBA PNG", files["RGBA PNG"], files["RGBA PNG"])]
    lines = ["| endpoint | image | peak growth MiB | bytes per pixel |", "|---|---|---:|---:|"]
    for endpoint, kind, f, mask in cases:
        r = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(run), str(idx),
                            endpoint.split()[0], str(f), str(mask)],
                           capture_output=True, text=True, cwd=str(REPO))
        if r.returncode:
            raise RuntimeError(r.stderr[-2000:])
        grown = int(r.stdout.split()[-1])
        lines.append(f"| {endpoint} | {kind} | {grown / 2 ** 20:.0f} | {grown / side ** 2:.1f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--seconds", type=float, default=600, help="stop sending after this long")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-side", type=int, default=128)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--index-images", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--threads", default="1", help="torch intra-op threads of the service, "
                                                   "one run per value")
    ap.add_argument("--bad-fraction", type=float, default=0.0,
                    help="share of malformed / oversized requests")
    ap.add_argument("--big", type=float, default=0.0,
                    help="share of valid queries with a big image (--big-side px square)")
    ap.add_argument("--big-side", type=int, default=2000)
    ap.add_argument("--max-pixels", type=int, default=5_000_000)
    ap.add_argument("--max-upload-mb", type=float, default=2.0)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--memory", action="store_true",
                    help="also measure the memory of one request per pixel (--memory-side px)")
    ap.add_argument("--memory-side", type=int, default=4000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/http_load.md")
    args = ap.parse_args()
    from spml_deploy.serving.http import request_memory_bytes

    max_upload = int(args.max_upload_mb * 2 ** 20)
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results, mem_lines = [], []
    with tempfile.TemporaryDirectory(prefix="spml-http-load-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        run, idx, images = prepare(root, args.max_side, args.index_images, args.size)
        print(f"prepared run + index in {time.perf_counter() - t:.1f} s", flush=True)
        bodies = payloads(images, args.max_pixels, max_upload,
                          args.big_side if args.big > 0 else None)
        jobs = mixed_jobs(args.requests, args.bad_fraction, args.big, len(bodies["val"]),
                          args.size)
        for threads in [int(v) for v in args.threads.split(",")]:
            server, url, health = start_server(
                run, idx, threads=threads, max_pixels=args.max_pixels, max_upload_bytes=max_upload,
                max_concurrent=args.max_concurrent, max_queue=args.max_queue)
            try:
                import httpx

                with httpx.Client(base_url=url, timeout=120) as c:       # warm-up, not counted
                    for i in range(args.warmup):
                        kind, status, body = send(c, ("query", i % len(bodies["val"]), 10, 10),
                                                  bodies, args.k, 100)
                        assert status == 200, body
                    if args.big > 0:
                        assert send(c, ("big", 0, 10, 10), bodies, args.k, 100)[1] == 200
                res = run_load(url, server.pid, jobs, bodies, args.clients, args.k, 100,
                               args.seconds)
            finally:
                stop_server(server)
            results.append((threads, res))
            print(f"threads {threads}: {res['sent'] / res['wall']:.1f} requests/s, "
                  f"{len(res['errors'])} errors", flush=True)
        if args.memory:
            mem_lines = memory_table(run, idx, root, args.memory_side)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    bound = request_memory_bytes(args.max_pixels, max_upload) * args.max_concurrent
    cmd = "python benchmarks/http_load.py " + " ".join(sys.argv[1:])
    mixed = args.bad_fraction > 0 or args.big > 0
    lines = [
        "# HTTP service under load: POST /v1/query, concurrent clients on loopback"
        + (", malformed and oversized requests mixed in" if mixed else ""),
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {cpu_name()}, {len(os.sched_getaffinity(0))} CPUs available (shared with "
        f"other processes), Linux {platform.release()}; Python {platform.python_version()}. "
        f"Server and clients share the machine. Date: {dt.date.today().isoformat()}. `uptime` "
        f"before: `{uptime_before}`; after: `{uptime_after}` (other processes load the machine: "
        "absolute numbers are noisy).",
        "",
        f"Service: `spml_deploy.serving.http.serve` (uvicorn, one process) on 127.0.0.1, torch "
        f"backend on the CPU, untrained tiny run deployed at max_side {args.max_side} (speed does "
        f"not depend on training), flat index of {health['index']['segments']:,} segments from "
        f"{health['index']['images']} scenes of {args.size}x{args.size} px; max_concurrent "
        f"{args.max_concurrent}, max_queue {args.max_queue}, max_pixels {args.max_pixels:,}, "
        f"upload limit {max_upload:,} bytes. A valid request: a {args.size}x{args.size} PNG + a "
        f"random point, k = {args.k} (network "
        f"{'twice: flip averaging, the index default' if health['index'].get('flip') else 'once'}"
        ", k-means segmentation of the query image, index search, store lookup), 20% of them "
        "/v1/segment"
        + (f", {args.big:.0%} of all requests a {args.big_side}x{args.big_side} query image"
           if args.big > 0 else "")
        + (f"; {args.bad_fraction:.0%} of the requests are bad ({', '.join(sorted(BAD))}: each "
           "must get its 4xx with detail and fix)" if args.bad_fraction > 0 else "")
        + f". {args.warmup} warm-up requests not counted; at most {args.requests} requests and "
        f"{args.seconds:.0f} s. Latencies are of the valid requests. Peak RSS: the service's "
        f"resident memory sampled every 10 ms, growth over the warmed-up service, against the "
        f"stated bound request_memory_bytes x max_concurrent = {bound / 2 ** 20:.0f} MiB.",
        "",
        "| clients | torch threads | requests (bad) | errors | wall s | requests/s | p50 ms | "
        "p90 ms | p99 ms | max ms | RSS before MiB | peak RSS growth MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    errors = []
    for threads, res in results:
        errors += res["errors"]
        lat = np.asarray(res["latencies"]) * 1000
        lines.append(
            f"| {args.clients} | {threads} | {res['sent']} ({res['bad']}) | "
            f"{len(res['errors'])} | {res['wall']:.1f} | {res['sent'] / res['wall']:.1f} | "
            f"{np.percentile(lat, 50):.0f} | {np.percentile(lat, 90):.0f} | "
            f"{np.percentile(lat, 99):.0f} | {lat.max():.0f} | {res['rss_base'] / 2 ** 20:.0f} | "
            f"{(res['rss_peak'] - res['rss_base']) / 2 ** 20:.0f} |")
    lines.append("")
    if errors:
        lines.append("Errors (first 5): " + "; ".join(errors[:5]))
        lines.append("")
    if mem_lines:
        lines += [f"## Memory of one request ({args.memory_side}x{args.memory_side} px)", "",
                  "Peak resident memory growth of one request in a fresh warmed-up process "
                  "(VmHWM reset through /proc/self/clear_refs), per pixel of the image: "
                  "`WORST_BYTES_PER_PIXEL` in serving/http.py (50) covers the worst row.", "",
                  *mem_lines, ""]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
