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

import contextlib
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

from spml_deploy.engine.bundle import Bundle, load_bundle
from spml_deploy.errors import ConfigError, SpmlError, require
from spml_deploy.engine.pipeline import PipelineOptions, load_pipeline
from spml_deploy.serving.ingest import (IngestSettings, Segmented, _backend, open_model,
                                        records_of)
from spml_deploy.serving.segment import (InputItem, JobReport, _write, plan_job, read_item,
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


@contextlib.contextmanager
def on_ray(address: str | None, num_cpus: int | None = None) -> Iterator[Any]:
    """The ``ray`` module, connected (:func:`connect`), with Ray Data's own progress bars and
    info logs off (the jobs have theirs); a Ray instance started here is shut down after."""
    started = connect(address, num_cpus)
    ray = _ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _rows(todo: list[InputItem]) -> list[dict[str, str]]:
    """Ray Data rows of the images to process (``listed_in`` kept for the not-found message)."""
    return [{"path": str(it.path), "rel": it.rel,
             "listed_in": str(it.listed_in) if it.listed_in is not None else ""} for it in todo]


def _items(batch: dict[str, np.ndarray]) -> list[InputItem]:
    """The :class:`InputItem` of each row of a batch (the inverse of :func:`_rows`)."""
    return [InputItem(Path(p), str(r), Path(str(lst)) if str(lst) else None)
            for p, r, lst in zip(batch["path"], batch["rel"], batch["listed_in"])]


def _map_on_actors(ray, todo: list[InputItem], worker: type, ctor: dict[str, Any], *,
                   workers: int | None, cpus_per_worker: int, batch: int, device: str):
    """``map_batches`` of ``worker`` (built with ``ctor``) over the rows of ``todo``, ``batch``
    rows a call, on a pool of actors: ``workers`` of them (default: one per GPU of the cluster
    on CUDA, else its CPUs / ``cpus_per_worker``), never more than there are batches."""
    gpu = torch.device(device).type == "cuda"
    if workers is None:
        cluster = ray.cluster_resources()
        workers = int(cluster.get("GPU", 0)) if gpu else int(cluster.get("CPU", 1)) // cpus_per_worker
    rows = _rows(todo)
    blocks = max(1, -(-len(rows) // batch))
    return ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        worker, fn_constructor_kwargs=ctor, batch_size=batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, min(int(workers), blocks))),
        num_cpus=cpus_per_worker, num_gpus=1 if gpu else 0)


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
        model = load_bundle(spec.model, verify=False)      # the driver verified it
        self.pipe = load_pipeline(model, backend=spec.backend, device=spec.device,
                                  options=spec.options, **spec.backend_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        pp = getattr(self.pipe, "pp", None)
        reads = [read_item(it, pp) for it in _items(batch)]
        errors = [r.error or "" for r in reads]
        records, stages = [""] * len(reads), ["{}"] * len(reads)
        good = [i for i, r in enumerate(reads) if r.error is None]
        if good:
            try:
                staged = self.pipe.forward([reads[i].image for i in good],
                                           [reads[i].resized for i in good] if pp is not None else None)
                outputs = self.pipe.finish(staged)
            except SpmlError as exc:
                for i in good:
                    errors[i] = exc.message
            else:
                share = {k: v / len(good) for k, v in staged.timings.items()}
                for i, res in zip(good, outputs):
                    r = reads[i]
                    record, write_s = _write(self.out, r.item, r.image, res, self.pipe.palette,
                                             self.spec.overlay)
                    records[i] = json.dumps(record)
                    stages[i] = json.dumps({**share, "write": write_s})
        return {"path": [str(r.item.path) for r in reads], "error": errors, "record": records,
                "read_s": [float(r.seconds) for r in reads], "stages": stages}

    def __del__(self) -> None:  # pragma: no cover - actor teardown
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            pipe.close()


def run_segment_job_ray(model: str | Path | Bundle, source: str | Path, out: Path, *,
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
        Others: as the local job and :func:`spml_deploy.engine.pipeline.load_pipeline`.
    """
    out = Path(out)
    # the model is checked on the driver (a mistyped path fails here, not in every actor)
    bundle = load_bundle(model)
    plan = plan_job(source, out, skip_existing=skip_existing, class_names=bundle.classes)
    report = plan.report
    spec = WorkerSpec(str(bundle.source or bundle.folder), str(out), backend, device, options, dict(backend_options),
                      overlay, cpus_per_worker)
    failed_lines: list[str] = []
    t_start = time.perf_counter()
    bar = tqdm(total=plan.total, initial=report.skipped, desc="segment (ray)", unit="img",
               disable=not progress, dynamic_ncols=True)
    try:
        if plan.todo:
            with on_ray(address, num_cpus) as ray, open(out / "results.jsonl", "a") as results_f:
                result = _map_on_actors(ray, plan.todo, SegmentWorker, {"spec": spec},
                                        workers=workers, cpus_per_worker=cpus_per_worker,
                                        batch=batch, device=device)
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
        sweep_partial_files(out)   # an actor killed mid-write leaves its temporary file
        report.seconds = time.perf_counter() - t_start
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
        bundle = open_model(model, verify=False)        # the driver verified it
        self.manifest = bundle.manifest
        self._backend = _backend(bundle, backend, device, **backend_options)
        self.be = self._backend.__enter__()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        reads = [read_item(it) for it in _items(batch)]
        errors = [r.error or "" for r in reads]
        records = [b""] * len(reads)
        good = [i for i, r in enumerate(reads) if r.error is None]
        if good:
            try:
                done = records_of(self.settings, self.be, self.manifest,
                                  [reads[i].item for i in good], [reads[i].image for i in good])
            except SpmlError as exc:
                for i in good:
                    errors[i] = exc.message
            else:
                for i, rec in zip(good, done):
                    records[i] = pickle.dumps(rec)
        return {"path": [str(r.item.path) for r in reads], "record": records, "error": errors}

    def __del__(self) -> None:  # pragma: no cover - actor teardown
        ctx = getattr(self, "_backend", None)
        if ctx is not None:
            ctx.__exit__(None, None, None)


def ray_segmenter(model: str | Path | Bundle, *, address: str | None = None, workers: int | None = None,
                  cpus_per_worker: int = 1, batch: int = 4, backend: str = "torch",
                  device: str = "cpu", num_cpus: int | None = None, **backend_options: Any):
    """A segmenter for :func:`spml_deploy.serving.ingest.build_index` / ``add_to_index``
    that runs on Ray (arguments as :func:`run_segment_job_ray`): the images are read, embedded
    and segmented by the actors; the driver receives the records ``batch`` images at a time."""
    def segment(todo: list, settings: IngestSettings) -> Iterator[Segmented]:
        ctor = dict(model=str(model.folder if isinstance(model, Bundle) else model), backend=backend, device=device,
                    backend_options=dict(backend_options), settings=settings,
                    threads=cpus_per_worker)
        with on_ray(address, num_cpus) as ray:
            result = _map_on_actors(ray, todo, IndexWorker, ctor, workers=workers,
                                    cpus_per_worker=cpus_per_worker, batch=batch, device=device)
            for part in result.iter_batches(batch_size=batch, batch_format="numpy"):
                found = [len(r) > 0 for r in part["record"]]
                records = [pickle.loads(bytes(r)) for r, ok in zip(part["record"], found) if ok]
                failed = [(str(p), str(e)) for p, e, ok in zip(part["path"], part["error"], found)
                          if not ok]
                yield records, failed, len(found)
    return segment
