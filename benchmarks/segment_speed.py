"""``spml-deploy segment`` throughput and where its time goes (issue 4).

Runs the real batch job - :func:`spml_deploy.serving.segment.run_segment_job` on a pipeline from
:func:`spml_deploy.engine.pipeline.load_pipeline`, the code behind the CLI - on a folder of square
images, for every combination of backend (torch, onnxruntime), classifier (softmax, knn) and
refinement (off, on), and reports images/s, wall and CPU time per image, the job's per-stage
split and the share of the wall time that is not the network.

Target (issue 4): everything after the network (classifier, kNN, refinement, IO) takes at most
30% of the wall time. Two readings are reported:

* ``non-network % of wall`` (the target check): ``1 - network / wall`` -- everything the job
  spends outside the backend call, i.e. reading + decoding the image files, preprocessing,
  classifier / kNN, refinement, the label read-out and the writing of the outputs, plus the
  job's own overhead. Reading and writing run in background threads, and the classifier /
  kNN / refinement / read-out of one batch run in a second thread while the network computes
  the next batch (``Pipeline.forward`` / ``Pipeline.finish``), so only the part of them that
  does not overlap with the network counts here.
* ``post-network % of stages``: (classifier + refine + postprocess + write) / (sum of the
  stage times), i.e. reading and preprocessing left out; stage times are summed over threads.

Per stage (ms/image): ``read+preprocess`` (file read + decode in the reader threads, then
resize / normalise / pad), ``network`` (backend call), ``classifier`` (softmax of the logits, or
for ``knn`` the k-means segments of every image + the k-nearest-prototype vote),
``refine`` (random walk), ``postprocess`` (upsampling of the class scores to the input size,
argmax, resize to the original size), ``write`` (label PNG encoding + atomic write, the
results.jsonl record; in the writer threads).

The model: ``--run`` (a run folder or bundle, e.g. the demo's ``runs/spml-points``), or
``--preset`` for an untrained model of that preset (random weights, and for ``knn`` a random
prototype memory of ``--memory-size`` entries; throughput does not depend on training, except
that the random walk's ``auto`` method picks its formulation from the data). The ONNX Runtime
rows use a bundle exported into a temporary folder (fp32, opset 17, dynamic axes).
Images: ``--images DIR``, or ``--n-images`` built-in synthetic scenes of ``--size`` pixels
rendered into a temporary folder.

The variants run interleaved in ``--rounds`` rounds (the development machine is shared, its load
drifts); each number is the median over the rounds. One warm-up job per variant comes first,
and one untimed job whenever the number of intra-op threads changes.

    # CPU table (committed): the demo model, 256x256
    .venv/bin/python benchmarks/segment_speed.py --run /tmp/demo_full/runs/spml-points \\
        --size 256 --batch 4 --threads 1,2 --rounds 5
    # (that run folder is made by: spml-deploy demo --out /tmp/demo_full)
    # GPU table (H100-class): untrained resnet50 preset, 512x512, batch 16, bf16 channels-last
    .venv/bin/python benchmarks/segment_speed.py --device cuda --preset resnet50 --size 512 \\
        --batch 16 --n-images 256 --precision bf16 --channels-last --backends torch \\
        --out benchmarks/results/segment_speed_gpu.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from spml_deploy.serving.segment import run_segment_job  # noqa: E402

from spml_deploy.engine.pipeline import PipelineOptions, load_pipeline
from spml_deploy.sysinfo import cpu_name, format_load

log = logging.getLogger("segment_speed")
STAGES = ("read+preprocess", "network", "classifier", "refine", "postprocess", "write")
POST = ("classifier", "refine", "postprocess", "write")
TARGET = 0.30






def _cpu_seconds() -> float:
    """Process CPU time (user + system, all threads) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


# --------------------------------------------------------------------------------------------
# inputs


def render_images(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` built-in synthetic scenes (``size`` x ``size`` RGB PNGs) in ``folder``."""
    from PIL import Image

    from spml_deploy.data.synth import render_scene

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene = render_scene(size, np.random.default_rng([seed, i]))
        Image.fromarray(scene.image).save(folder / f"scene_{i:05d}.png")
    return folder


def untrained_run(folder: Path, preset: str, num_classes: int, memory_size: int,
                  max_side: int, seed: int = 0) -> Path:
    """An untrained run of ``preset`` (tests/runs.py) plus a random unit prototype memory."""
    from runs import make_run

    from spml_deploy.artifacts import read_manifest, write_manifest

    run = make_run(folder, num_classes=num_classes, preset=preset, seed=seed)
    m = read_manifest(run)
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((memory_size, m.model.embed_dim)).astype(np.float32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    from spml_deploy.engine.index import build_index

    build_index(protos, rng.integers(0, num_classes, memory_size), "flat").save(run / "memory.npz")
    m.add_file(run, "memory", "memory.npz")
    if max_side:
        from dataclasses import replace

        m.preprocess = replace(m.preprocess, max_side=max_side)
    write_manifest(run, m)
    return run


def export_onnx_bundle(run: Path, out: Path, imgsz: int) -> Path:
    from spml_deploy.export.bundle import export_bundle

    export_bundle(run, out, imgsz=imgsz)
    return out


# --------------------------------------------------------------------------------------------
# measuring


class TimedBackend:
    """Wraps a pipeline's backend; adds up the CPU time of the calling thread spent in it.

    With one intra-op thread (torch and ONNX Runtime then compute on the calling thread) on the
    CPU this is the network's CPU time; elsewhere it is not meaningful and is not reported.
    """

    def __init__(self, backend: Any):
        self._backend = backend
        self.cpu_s = 0.0

    def __call__(self, x: torch.Tensor) -> Any:
        c = time.thread_time()
        try:
            return self._backend(x)
        finally:
            self.cpu_s += time.thread_time() - c

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


def _job(pipe, images: Path, out: Path, batch: int, overlay: bool, threads: int) -> dict[str, Any]:
    """One segment job into a fresh ``out``; wall, CPU time and the job report."""
    if out.exists():
        shutil.rmtree(out)
    torch.set_num_threads(threads)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    pipe.backend.cpu_s = 0.0
    c0, t0 = _cpu_seconds(), time.perf_counter()
    report = run_segment_job(pipe, images, out, batch=batch, overlay=overlay, progress=False)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    if report.failed:
        raise RuntimeError(f"{report.failed} images failed: see {out / 'failed.txt'}")
    n = report.done
    stages = {k: 1e3 * v / n for k, v in report.stages.items()}
    return {"n": n, "wall_ms": 1e3 * wall / n, "cpu_ms": 1e3 * cpu / n, "ips": n / wall,
            "stages": stages, "net_cpu_ms": 1e3 * pipe.backend.cpu_s / n}


def _summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    med = lambda xs: float(np.median(xs))  # noqa: E731
    stages = {k: med([s["stages"].get(k, 0.0) for s in samples]) for k in STAGES}
    total = sum(stages.values()) or 1.0
    non_net = [1.0 - s["stages"]["network"] / s["wall_ms"] for s in samples]
    non_net_cpu = [1.0 - s["net_cpu_ms"] / s["cpu_ms"] for s in samples]
    post = [sum(s["stages"].get(k, 0.0) for k in POST) / sum(s["stages"].values())
            for s in samples]
    return {"ips": med([s["ips"] for s in samples]),
            "wall_ms": med([s["wall_ms"] for s in samples]),
            "cpu_ms": med([s["cpu_ms"] for s in samples]), "stages": stages,
            "share": {k: v / total for k, v in stages.items()},
            "non_network": med(non_net), "non_network_range": (min(non_net), max(non_net)),
            "post_network": med(post), "n": samples[0]["n"],
            "net_cpu_ms": med([s["net_cpu_ms"] for s in samples]),
            "non_network_cpu": med(non_net_cpu)}


def measure(variants: list[dict[str, Any]], images: Path, work: Path, args) -> list[dict[str, Any]]:
    """Run every variant ``args.rounds`` times, interleaved; warm-up job first."""
    samples: dict[str, list[dict[str, Any]]] = {v["label"]: [] for v in variants}
    warm = work / "warmup"
    render = sorted(images.iterdir())[: 2 * args.batch]
    warm.mkdir(parents=True, exist_ok=True)
    for f in render:
        (warm / f.name).write_bytes(f.read_bytes())
    for v in variants:
        _job(v["pipe"], warm, work / "out", args.batch, args.overlay, v["threads"])
    current = None
    for r in range(args.rounds):
        for v in variants:
            if v["threads"] != current:      # a new intra-op pool size: one untimed job first
                _job(v["pipe"], warm, work / "out", args.batch, args.overlay, v["threads"])
                current = v["threads"]
            s = _job(v["pipe"], images, work / "out", args.batch, args.overlay, v["threads"])
            samples[v["label"]].append(s)
            log.info("round %d %-40s %6.1f img/s  non-network %4.1f%%", r + 1, v["label"],
                     s["ips"], 100 * (1 - s["stages"]["network"] / s["wall_ms"]))
    return [{**{k: v[k] for k in v if k != "pipe"}, **_summary(samples[v["label"]])}
            for v in variants]


# --------------------------------------------------------------------------------------------
# report


def _cpu_share_valid(row: dict[str, Any], device: str) -> bool:
    return device == "cpu" and row["threads"] == 1


def _summary_table(rows: list[dict[str, Any]], device: str) -> list[str]:
    lines = ["| backend | threads | classifier | refine | images/s | wall ms/img | CPU ms/img | "
             "network ms/img (wall) | network CPU ms/img | non-network % of wall (rounds) | "
             "non-network % of CPU | post-network % of stages | <= 30% of wall? |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lo, hi = r["non_network_range"]
        cpu_ok = _cpu_share_valid(r, device)
        cells = [r["backend"], str(r["threads"]), r["classifier"], "on" if r["refine"] else "off",
                 f"{r['ips']:.1f}", f"{r['wall_ms']:.1f}", f"{r['cpu_ms']:.1f}",
                 f"{r['stages']['network']:.1f}",
                 f"{r['net_cpu_ms']:.1f}" if cpu_ok else "n/a",
                 f"{100 * r['non_network']:.0f} ({100 * lo:.0f}-{100 * hi:.0f})",
                 f"{100 * r['non_network_cpu']:.0f}" if cpu_ok else "n/a",
                 f"{100 * r['post_network']:.0f}",
                 "yes" if r["non_network"] <= TARGET else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _stage_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| backend | threads | classifier | refine | "
             + " | ".join(f"{k} ms (%)" for k in STAGES) + " |",
             "|---|---:|---|---|" + "---:|" * len(STAGES)]
    for r in rows:
        st = " | ".join(f"{r['stages'][k]:.2f} ({100 * r['share'][k]:.0f}%)" if r["stages"][k]
                        else "-" for k in STAGES)
        lines.append(f"| {r['backend']} | {r['threads']} | {r['classifier']} | "
                     f"{'on' if r['refine'] else 'off'} | {st} |")
    return lines


def write_report(path: Path, rows: list[dict[str, Any]], args, meta: dict[str, Any]) -> None:
    cmd = " ".join(["benchmarks/segment_speed.py"] + sys.argv[1:])
    lines = [
        f"# `spml-deploy segment` speed ({meta['device']}, {args.size}x{args.size}, "
        f"batch {args.batch})",
        "",
        f"* Command: `.venv/bin/python {cmd}`",
        f"* Date: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}; machine: {cpu_name()}, "
        f"{len(os.sched_getaffinity(0))} CPUs available to the process; device: "
        f"{meta['device']}; {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {meta['ort']}; "
        f"intra-op threads (torch and ONNX Runtime): {args.threads}; reader and writer threads of "
        f"the job: {meta['io_threads']} each.",
        f"* Load average (1/5/15 min) before: {meta['load_before']}, after: {meta['load_after']}."
        " The machine is shared with other jobs: variants run interleaved in "
        f"{args.rounds} rounds, each number is the median over the rounds.",
        f"* Model: {meta['model']}. Network input: {meta['net_input']}. Images: {meta['images']}"
        f" ({rows[0]['n']} per job). Refinement method: `{args.rw_method}`.",
        f"* {meta['overlay']}",
        "",
        "Definitions. Wall and CPU time (user + system, all threads of the process) per image "
        "over the whole job (discovery, reading, the pipeline, writing, waiting for the last "
        "writes). **non-network % of wall** = 1 - network / wall: the target check. It counts "
        "everything that is not the backend call -- classifier, kNN, refinement, the label "
        "read-out and **all IO, reading and decoding the image files included** -- but, as "
        "reading and writing run in background threads and the read-out of a batch (classifier, "
        "kNN, refinement, label maps) runs in a second thread while the network computes the "
        "next batch, only the part of them that does not overlap with the network. **non-network % of CPU** = 1 - network CPU / process CPU: the same split in "
        "CPU time, which does not depend on the other jobs of a shared machine and charges the "
        "background IO in full (only with one intra-op thread on the CPU, where the network "
        "computes on the calling thread). **post-network % of stages** = (classifier + refine + "
        "postprocess + write) / sum of the stage times (reading + preprocessing left out).",
        "",
        *_summary_table(rows, meta["device_kind"]),
        "",
        "Per stage: ms/image (wall time of the stage, summed over the threads that run it) and its "
        "share of the summed stage times. `read+preprocess`: file read + decode + resize (reader "
        "threads) and uint8 upload / normalise (main thread); `classifier` (like `refine` and "
        "`postprocess`, in the read-out thread): softmax, or for knn "
        "the k-means segments of every image + the vote of the k nearest memory prototypes; "
        "`postprocess`: upsampling of the class scores, argmax, resize to the original size; "
        "`write`: label PNG encoding, atomic write (rename, no fsync) and the results.jsonl record (writer "
        "threads).",
        "",
        *_stage_table(rows),
        "",
    ]
    met = [r["label"] for r in rows if r["non_network"] <= TARGET]
    missed = [r["label"] for r in rows if r["non_network"] > TARGET]
    lines += [f"Target (non-network <= {100 * TARGET:.0f}% of wall): met by "
              f"{', '.join(met) or 'none'}; missed by {', '.join(missed) or 'none'}.", ""]
    if meta["device_kind"] == "cpu":
        lines += ["The GPU table (H100-class, resnet50 preset, 512x512, batch 16) is **not yet "
                  "measured**: the development machine has no GPU. It comes from the same script "
                  "(only the device, model and sizes differ): `.venv/bin/python "
                  "benchmarks/segment_speed.py --device cuda --preset resnet50 --size 512 "
                  "--batch 16 --n-images 256 --precision bf16 --channels-last --backends torch "
                  "--out benchmarks/results/segment_speed_gpu.md`.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", path)


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="run folder or bundle (default: --preset, untrained)")
    ap.add_argument("--preset", default="tiny",
                    help="untrained model preset when --run is not given")
    ap.add_argument("--num-classes", type=int, default=21, help="classes of the untrained model")
    ap.add_argument("--memory-size", type=int, default=100_000,
                    help="prototypes in the untrained model's random kNN memory")
    ap.add_argument("--images", type=Path, help="folder of images (default: synthetic scenes)")
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--size", type=int, default=256, help="side of the synthetic scenes")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", default="torch,onnxruntime")
    ap.add_argument("--classifiers", default="softmax,knn")
    ap.add_argument("--refine", default="off,on")
    ap.add_argument("--rw-method", default="auto", help="random-walk method (refine.random_walk)")
    ap.add_argument("--threads", default=str(len(os.sched_getaffinity(0))),
                    help="intra-op threads of torch and ONNX Runtime; a list (1,2) runs each")
    ap.add_argument("--precision", default="fp32", help="torch backend precision (CUDA: bf16...)")
    ap.add_argument("--channels-last", action="store_true", help="torch backend channels-last")
    ap.add_argument("--compile", action="store_true", help="torch backend: torch.compile")
    ap.add_argument("--overlay", action="store_true", help="also write overlays (--overlay)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/segment_speed_cpu.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import onnxruntime
    from spml_deploy.engine.forward import io_threads as _io_threads

    load_before = format_load()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if args.run is not None:
            run = args.run
            model = f"`{args.run}`"
        else:
            run = untrained_run(tmp / "run", args.preset, args.num_classes, args.memory_size,
                                max_side=args.size)
            model = (f"untrained `{args.preset}` preset ({args.num_classes} classes, random "
                     f"weights), random kNN memory of {args.memory_size} unit prototypes")
        from spml_deploy.artifacts import read_manifest

        man = read_manifest(run)
        model += (f" (backbone {man.model.backbone}, D={man.model.embed_dim}, "
                  f"{man.num_classes} classes)")
        if args.images is not None:
            images, img_desc = args.images, f"`{args.images}`"
        else:
            images = render_images(tmp / "images", args.n_images, args.size)
            img_desc = f"{args.n_images} synthetic {args.size}x{args.size} scenes (PNG)"
        backends = args.backends.split(",")
        bundle = None
        if any(b != "torch" for b in backends):
            bundle = export_onnx_bundle(run, tmp / "bundle", args.size)
        variants = []
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            for be in backends:
                opts: dict[str, Any] = {}
                if be == "torch":
                    opts = {"precision": args.precision, "channels_last": args.channels_last,
                            "compile": args.compile}
                elif be == "onnxruntime":
                    opts = {"threads": threads}
                name = (be if be != "torch" or args.precision == "fp32"
                        else f"torch {args.precision}")
                if be == "torch" and args.compile:
                    name += " compiled"
                for clf in args.classifiers.split(","):
                    for ref in args.refine.split(","):
                        refine = ref == "on"
                        options = PipelineOptions(classifier=clf, refine=refine,
                                                  rw_method=args.rw_method)
                        pipe = load_pipeline(run if be == "torch" else bundle, backend=be,
                                             device=args.device, options=options, **opts)
                        pipe.backend = TimedBackend(pipe.backend)
                        variants.append({
                            "label": f"{name}/{threads}t/{clf}/{'refine' if refine else 'plain'}",
                            "backend": name, "threads": threads, "classifier": clf,
                            "refine": refine, "pipe": pipe})
        side = man.preprocess.max_side
        net_input = (f"longest side resized to {side} (manifest max_side), padded to a multiple "
                     f"of {man.preprocess.pad_multiple}" if side else "original size")
        rows = measure(variants, images, tmp / "work", args)
        for v in variants:
            v["pipe"].close()
    meta = {
        "device": _device_name(args.device), "ort": onnxruntime.__version__,
        "device_kind": torch.device(args.device).type, "io_threads": _io_threads(),
        "load_before": load_before, "load_after": format_load(),
        "model": model, "net_input": net_input, "images": img_desc,
        "overlay": "Overlays written too (`--overlay`)." if args.overlay else
                   "No overlays (the CLI default).",
    }
    for r in rows:
        log.info("%-40s %6.1f img/s wall %6.1f ms cpu %6.1f ms non-network %4.1f%%", r["label"],
                 r["ips"], r["wall_ms"], r["cpu_ms"], 100 * r["non_network"])
    write_report(args.out, rows, args, meta)


if __name__ == "__main__":
    main()
