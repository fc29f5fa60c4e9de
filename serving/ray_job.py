"""The segment job and the index build on a Ray cluster (``--ray [ADDRESS]``).

The images are listed, checked and filtered (``--skip-existing``) on the driver exactly as by the
local job (:func:`spml_deploy.serving.segment.plan_job`); then a Ray Data pipeline reads them and
runs ``map_batches`` over a pool of actors, each holding one model replica (one per GPU on a GPU
cluster, else one per ``cpus_per_worker`` CPUs). An actor segments its batch and writes the label
maps and overlays itself, atomically and with the same names as the local job; the driver
appends each image's ``results.jsonl`` line and each failure's ``failed.txt`` line as the rows
stream back. A bad file is a ``failed.txt`` line, never the end of the job. A worker that dies
leaves no partial file (atomic renames); Ray retries its batch on another actor, and a job that
is itself killed resumes with ``--skip-existing`` like the local one (label maps without a
``results.jsonl`` line get it restored).

``index build --ray`` / ``index add --ray`` (:func:`ray_segmenter`): actors embed and segment
the images (one backend each) and send back the store records; the driver writes them to the
SQLite store, batch by batch in one transaction each, and builds the FAISS index once at the
end, as the local build does (an interrupted build is completed by ``index add``).

``ray`` is an optional dependency: ``pip install 'spml-deploy[ray]'``.
"""
from __future__ import annotations

import json
import logging
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from spml_deploy.artifacts import model_folder, read_manifest
from spml_deploy.errors import ConfigError, SpmlError, require
from spml_deploy.pipeline import PipelineOptions, load_pipeline
from spml_deploy.serving.retrieval import IngestSettings, Segmented, _backend, records_of
from spml_deploy.serving.segment import (InputItem, JobReport, _read, _write, plan_job,
                                         sweep_partial_files)

log = logging.getLogger(__name__)


def _ray() -> Any:
    return require("ray", "ray", "running the segment job on Ray (--ray)")


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` (``auto``: the one this machine belongs to) or, with
    ``None``, start a local one with ``num_cpus`` CPUs. Returns True when this call started Ray
    (the caller shuts it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    quiet = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address or 'a new local instance'} "
                          f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})",
                          fix="start one with 'ray start --head' and pass its address "
                              "(host:6379, or 'auto' on one of its machines), or give --ray "
                              "without an address for a local instance") from None
    return True


@dataclass(frozen=True)
class WorkerSpec:
    """What each actor needs to build its model replica and write its outputs."""

    model: str
    out: str
    backend: str = "torch"
    device: str = "cpu"
    options: PipelineOptions = PipelineOptions()
    backend_options: dict[str, Any] = field(default_factory=dict)
    overlay: bool = False
    threads: int = 1


class SegmentWorker:
    """A Ray Data actor: one model replica; segments a batch of rows (``path``, ``rel``) and
    writes their outputs; returns per row the ``results.jsonl`` line or the failure reason."""

    def __init__(self, spec: WorkerSpec):
        torch.set_num_threads(max(1, spec.threads))
        self.spec = spec
        self.out = Path(spec.out)
        self.pipe = load_pipeline(spec.model, backend=spec.backend, device=spec.device,
                                  options=spec.options, **spec.backend_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        items = [InputItem(Path(p), str(r)) for p, r in zip(batch["path"], batch["rel"])]
        pp = getattr(self.pipe, "pp", None)
        reads = [_read(it, pp) for it in items]
        rows: dict[str, dict[str, Any]] = {}
        for r in reads:
            rows[r.item.rel] = {"error": r.error or "", "record": "",
                                "read_s": float(r.seconds), "stages": "{}"}
        good = [r for r in reads if r.error is None]
        if good:
            try:
                staged = self.pipe.forward([r.image for r in good],
                                           [r.resized for r in good] if pp is not None else None)
                outputs = self.pipe.finish(staged)
            except SpmlError as exc:
                for r in good:
                    rows[r.item.rel]["error"] = exc.message
            else:
                share = {k: v / len(good) for k, v in staged.timings.items()}
                for r, res in zip(good, outputs):
                    record, write_s = _write(self.out, r.item, r.image, res, self.pipe.palette,
                                             self.spec.overlay)
                    rows[r.item.rel]["record"] = json.dumps(record)
                    rows[r.item.rel]["stages"] = json.dumps({**share, "write": write_s})
        order = [it.rel for it in items]
        return {"path": [str(it.path) for it in items], "rel": order,
                **{key: [rows[rel][key] for rel in order]
                   for key in ("error", "record", "read_s", "stages")}}

    def __del__(self) -> None:  # pragma: no cover - actor teardown
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            pipe.close()


def run_segment_job_ray(model: str | Path, source: str | Path, out: Path, *,
                        address: str | None = None, workers: int | None = None,
                        cpus_per_worker: int = 1, batch: int = 4, overlay: bool = False,
                        skip_existing: bool = False, progress: bool = True,
                        backend: str = "torch", device: str = "cpu",
                        options: PipelineOptions = PipelineOptions(),
                        num_cpus: int | None = None, **backend_options: Any) -> JobReport:
    """Segment every image of ``source`` into ``out`` on Ray: same outputs, records, failures
    and resume rules as :func:`spml_deploy.serving.segment.run_segment_job`.

    Args:
        address: Ray cluster address (``auto``, ``host:6379``, ``ray://host:10001``); None starts
            a local Ray instance with ``num_cpus`` CPUs (default: all).
        workers: model replicas (actors); default: one per GPU on CUDA, else
            CPUs / ``cpus_per_worker``.
        cpus_per_worker: CPUs reserved by each actor (its torch threads).
        batch: images per ``map_batches`` call (per network call).
        Others: as the local job and :func:`spml_deploy.pipeline.load_pipeline`.
    """
    out = Path(out)
    # the model is checked on the driver (a mistyped path fails here, not in every actor)
    manifest = read_manifest(model_folder(model), verify=True)
    plan = plan_job(source, out, skip_existing=skip_existing, class_names=list(manifest.classes))
    report = plan.report
    started = connect(address, num_cpus)
    ray = _ray()
    ray.data.DataContext.get_current().enable_progress_bars = False   # the job has its own bar
    logging.getLogger("ray.data").setLevel(max(logging.WARNING, logging.getLogger().level))
    t_start = time.perf_counter()
    try:
        gpu = torch.device(device).type == "cuda"
        cluster = ray.cluster_resources()
        if workers is None:
            workers = int(cluster.get("GPU", 0)) if gpu else int(cluster.get("CPU", 1)) // cpus_per_worker
        workers = max(1, int(workers))
        spec = WorkerSpec(str(model), str(out), backend, device, options, dict(backend_options),
                          overlay, cpus_per_worker)
        failed_lines: list[str] = []
        bar = tqdm(total=plan.total, initial=report.skipped, desc="segment (ray)", unit="img",
                   disable=not progress, dynamic_ncols=True)
        try:
            if plan.todo:
                rows = [{"path": str(it.path), "rel": it.rel} for it in plan.todo]
                blocks = max(1, -(-len(rows) // batch))
                ds = ray.data.from_items(rows, override_num_blocks=blocks)
                result = ds.map_batches(
                    SegmentWorker, fn_constructor_kwargs={"spec": spec}, batch_size=batch,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=min(workers, blocks)),
                    num_cpus=cpus_per_worker, num_gpus=1 if gpu else 0)
                with open(out / "results.jsonl", "a") as results_f:
                    for row in result.iter_rows():
                        report.stages["read+preprocess"] += float(row["read_s"])
                        if row["record"]:
                            results_f.write(row["record"] + "\n")
                            results_f.flush()
                            for key, v in json.loads(row["stages"]).items():
                                report.stages[key] += v
                            report.done += 1
                        else:
                            failed_lines.append(f"{row['path']}\t{row['error']}")
                            report.failed += 1
                        bar.update(1)
        finally:
            bar.close()
            if failed_lines:
                with open(out / "failed.txt", "a") as f:
                    f.write("\n".join(failed_lines) + "\n")
    finally:
        sweep_partial_files(out)   # an actor killed mid-write leaves its temporary file
        report.seconds = time.perf_counter() - t_start
        if started:
            ray.shutdown()
    return report


# --------------------------------------------------------------------------------------------
# index build


class IndexWorker:
    """A Ray Data actor for the index build: one backend; returns per row (``path``, ``rel``)
    the pickled store record, or the failure reason."""

    def __init__(self, model: str, backend: str, device: str, backend_options: dict[str, Any],
                 settings: IngestSettings, threads: int):
        torch.set_num_threads(max(1, threads))
        self.settings = settings
        self.manifest = read_manifest(model_folder(model), verify=False)  # the driver verified it
        self._backend = _backend(model, backend, device, **backend_options)
        self.be = self._backend.__enter__()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        items = [InputItem(Path(p), str(r)) for p, r in zip(batch["path"], batch["rel"])]
        reads = [_read(it) for it in items]
        out = {it.rel: (b"", r.error or "") for it, r in zip(items, reads)}
        good = [r for r in reads if r.error is None]
        if good:
            try:
                records = records_of(self.settings, self.be, self.manifest,
                                     [r.item for r in good], [r.image for r in good])
            except SpmlError as exc:
                out.update({r.item.rel: (b"", exc.message) for r in good})
            else:
                out.update({r.item.rel: (pickle.dumps(rec), "") for r, rec in zip(good, records)})
        return {"path": [str(it.path) for it in items],
                "record": [out[it.rel][0] for it in items],
                "error": [out[it.rel][1] for it in items]}

    def __del__(self) -> None:  # pragma: no cover - actor teardown
        ctx = getattr(self, "_backend", None)
        if ctx is not None:
            ctx.__exit__(None, None, None)


def ray_segmenter(model: str | Path, *, address: str | None = None, workers: int | None = None,
                  cpus_per_worker: int = 1, batch: int = 4, backend: str = "torch",
                  device: str = "cpu", num_cpus: int | None = None, **backend_options: Any):
    """A segmenter for :func:`spml_deploy.serving.retrieval.build_index` / ``add_to_index``
    that runs on Ray (arguments as :func:`run_segment_job_ray`): the images are read, embedded
    and segmented by the actors; the driver receives the records ``batch`` images at a time."""
    def segment(todo: list, settings: IngestSettings):
        started = connect(address, num_cpus)
        ray = _ray()
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(max(logging.WARNING, logging.getLogger().level))
        try:
            yield from _ray_records(ray, todo, settings, str(model), workers, cpus_per_worker,
                                    batch, backend, device, backend_options)
        finally:
            if started:
                ray.shutdown()
    return segment


def _ray_records(ray, todo: list, settings: IngestSettings, model: str, workers: int | None,
                 cpus_per_worker: int, batch: int, backend: str, device: str,
                 backend_options: dict[str, Any]) -> Iterator[Segmented]:
    gpu = torch.device(device).type == "cuda"
    cluster = ray.cluster_resources()
    if workers is None:
        workers = int(cluster.get("GPU", 0)) if gpu else int(cluster.get("CPU", 1)) // cpus_per_worker
    rows = [{"path": str(it.path), "rel": it.rel} for it in todo]
    blocks = max(1, -(-len(rows) // batch))
    result = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        IndexWorker, fn_constructor_kwargs=dict(model=model, backend=backend, device=device,
                                                backend_options=dict(backend_options),
                                                settings=settings, threads=cpus_per_worker),
        batch_size=batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, min(int(workers), blocks))),
        num_cpus=cpus_per_worker, num_gpus=1 if gpu else 0)
    for part in result.iter_batches(batch_size=batch, batch_format="numpy"):
        records = [pickle.loads(bytes(r)) for r in part["record"] if len(r)]
        failed = [(str(p), str(e)) for p, r, e in zip(part["path"], part["record"], part["error"])
                  if not len(r)]
        yield records, failed, len(part["path"])
