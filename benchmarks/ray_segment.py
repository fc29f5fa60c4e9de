"""The segment job on Ray against the local job: images/s with 1 and 2 Ray workers.

Runs :func:`spml_deploy.serving.segment.run_segment_job` (the local job, one process) and
:func:`spml_deploy.serving.ray_job.run_segment_job_ray` (a local Ray instance, one model replica
per worker, ``--cpus-per-worker`` torch threads each) on the same folder of built-in scenes with
an untrained model of ``--preset`` (throughput does not depend on training), each ``--rounds``
times, interleaved (the development machine is shared; medians are reported). The Ray figures
include the start of the job's actors (each loads its model replica) but not the start of the
Ray instance (once, reported apart); the local job's exclude its one model load.

    .venv/bin/python benchmarks/ray_segment.py --n-images 96 --size 256 --batch 4 --rounds 3 \\
        --out benchmarks/results/ray_segment.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from runs import make_run  # noqa: E402
from spml_deploy.engine.pipeline import load_pipeline
from spml_deploy.serving.segment import run_segment_job  # noqa: E402
from spml_deploy.data.synth import synthesize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--n-images", type=int, default=96)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus-per-worker", type=int, default=1)
    ap.add_argument("--workers", default="1,2", help="Ray worker counts to measure")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import ray

    from spml_deploy.serving.ray_job import run_segment_job_ray

    tmp = Path(tempfile.mkdtemp(prefix="spml-ray-bench-"))
    try:
        data = tmp / "scenes"
        synthesize(data, n_train=args.n_images, n_val=0, size=args.size, seed=0)
        images = data / "images"
        run = make_run(tmp / "run", num_classes=6, preset=args.preset)
        workers = [int(w) for w in args.workers.split(",")]
        ncpu = max(workers) * args.cpus_per_worker
        t = time.perf_counter()
        ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, _node_ip_address="127.0.0.1")
        ray_start = time.perf_counter() - t
        results: dict[str, list[tuple[float, float]]] = {}
        load_before = os.getloadavg()
        for r in range(args.rounds):
            torch.set_num_threads(args.cpus_per_worker * max(workers))
            pipe = load_pipeline(run)
            out = tmp / f"local{r}"
            t = time.perf_counter()
            rep = run_segment_job(pipe, images, out, batch=args.batch, progress=False)
            wall = time.perf_counter() - t
            pipe.close()
            assert rep.done == args.n_images
            results.setdefault(f"local job, 1 process, {args.cpus_per_worker * max(workers)} threads",
                               []).append((rep.done / rep.seconds, wall))
            for w in workers:
                out = tmp / f"ray{w}_{r}"
                t = time.perf_counter()
                rep = run_segment_job_ray(run, images, out, workers=w, batch=args.batch,
                                          cpus_per_worker=args.cpus_per_worker, progress=False)
                wall = time.perf_counter() - t
                assert rep.done == args.n_images, rep.format()
                results.setdefault(f"Ray, {w} worker(s) x {args.cpus_per_worker} CPU", []).append(
                    (rep.done / rep.seconds, wall))
        ray.shutdown()
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [f"# The segment job on Ray vs the local job ({args.preset}, {args.size}x{args.size})", "",
             "Command: `python benchmarks/ray_segment.py " + " ".join(sys.argv[1:]) + "`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"{platform.platform()}; Python {platform.python_version()}, torch {torch.__version__}, "
             f"ray {ray.__version__}. Date: {dt.date.today()}. Load average before: "
             + " ".join(f"{x:.2f}" for x in load_before) + ", after: "
             + " ".join(f"{x:.2f}" for x in load_after) + f". Ray instance start: {ray_start:.1f} s.", "",
             f"{args.n_images} built-in scenes, batch {args.batch}, untrained `{args.preset}` model, "
             f"softmax classifier, no refinement; median of {args.rounds} interleaved rounds.", "",
             "| job | images/s | wall s |", "|---|---:|---:|"]
    for name, vals in results.items():
        lines.append(f"| {name} | {statistics.median(v[0] for v in vals):.2f} | "
                     f"{statistics.median(v[1] for v in vals):.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
