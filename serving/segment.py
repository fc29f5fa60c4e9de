"""Batch segmentation of image folders (``spml-deploy segment``).

INPUT is a folder (searched recursively), a glob pattern, or a text file listing image paths.
OUTPUT receives ``labels/<relative path without extension>.png`` (palette PNG of class ids,
same size as the input), optional ``overlays/<same name>.png``, ``results.jsonl`` (one line per
image) and ``failed.txt`` (path and reason). Two inputs that would write the same label map
(``a.png`` and ``a.jpg`` of one folder) are refused before any work. Every file is written
atomically; ``--skip-existing`` resumes an interrupted job without redoing finished images and
restores the ``results.jsonl`` line of any finished label map that lacks one (and removes the
temporary files of writes a kill cut short); a bad image is reported and the job goes on.

Relative paths in a ``.txt`` list are resolved against the folder that holds the list.
"""
from __future__ import annotations

import functools
import glob as _glob
import io
import json
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from spml_deploy.errors import SpmlError
from spml_deploy.data.imageio import (IMAGE_EXTENSIONS, atomic_write_bytes, png_is_complete, read_label_png, write_label_png)
from spml_deploy.config import PreprocessConfig
from spml_deploy.engine.forward import Read, io_threads, read_batches, read_one

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputItem:
    path: Path       # the image file
    rel: str         # relative path used for the outputs (posix, with extension)
    listed_in: Path | None = None   # the .txt list that named it, if any


def discover(source: str | Path) -> list[InputItem]:
    """Images named by ``source``: a folder (recursive), a glob pattern, or a .txt list of paths."""
    text = str(source)
    p = Path(text)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        return [InputItem(f, f.relative_to(p).as_posix()) for f in files]
    if p.is_file() and p.suffix.lower() == ".txt":
        return _discover_list(p)
    if p.is_file():
        return [InputItem(p, p.name)]
    if any(ch in text for ch in "*?["):
        return _relative_to_common(sorted(Path(f) for f in _glob.glob(text, recursive=True)
                                          if Path(f).is_file()))
    raise SpmlError("input not found: not a folder, an image, a .txt list or a glob pattern",
                    path=source, fix="pass a folder of images, 'dir/**/*.jpg' or a text file of paths")


LIST_RULE = "relative paths in a .txt list are resolved against the folder that holds the list"


def _discover_list(listing: Path) -> list[InputItem]:
    """The images of a .txt list (one path a line, '#' comments); relative paths are resolved
    against the list's folder, so a list can travel with its images."""
    lines = [ln.strip() for ln in listing.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    paths = [Path(ln) if os.path.isabs(ln) else (listing.parent / ln) for ln in lines]
    if paths and not any(q.exists() for q in paths):
        first = paths[0]
        hint = ""
        if not os.path.isabs(lines[0]) and Path(lines[0]).exists():
            hint = (f"; '{lines[0]}' exists relative to the working directory: write the paths "
                    f"relative to {listing.parent.absolute()} or absolute")
        raise SpmlError(f"none of the {len(paths)} listed images exists (first one tried: "
                        f"{first.absolute()}); {LIST_RULE}{hint}", path=listing,
                        fix="write each path relative to the list's folder, or as an absolute path")
    return _relative_to_common(paths, listing)


def _relative_to_common(paths: list[Path], listed_in: Path | None = None) -> list[InputItem]:
    if not paths:
        return []
    absolute = [q.resolve() for q in paths]
    root = Path(os.path.commonpath([str(q.parent) for q in absolute]))
    return [InputItem(q, a.relative_to(root).as_posix(), listed_in)
            for q, a in zip(paths, absolute)]


def check_unique_outputs(items: list[InputItem], out: Path) -> list[InputItem]:
    """``items`` without repeats of one file; :class:`SpmlError` listing the clashes when two
    different inputs would write the same label map (``a.png`` and ``a.jpg`` of one folder: the
    output name drops the extension, so that label maps keep the ``<stem>.png`` names that
    ``spml-deploy eval`` and the dataset contract use)."""
    by_label: dict[Path, list[InputItem]] = defaultdict(list)
    for it in items:
        group = by_label[label_path(out, it.rel)]
        if not any(os.path.abspath(g.path) == os.path.abspath(it.path) for g in group):
            group.append(it)
    clashes = {lab: group for lab, group in by_label.items() if len(group) > 1}
    if clashes:
        shown = [f"{lab.relative_to(out)} <- " + ", ".join(str(g.path) for g in group)
                 for lab, group in list(clashes.items())[:10]]
        more = f" (and {len(clashes) - 10} more)" if len(clashes) > 10 else ""
        raise SpmlError(f"{len(clashes)} label map name(s) would be written by more than one "
                        f"input{more}: " + "; ".join(shown), path=out,
                        fix="rename one image of each pair (outputs are named after the path "
                            "without its extension), or segment them into separate OUTPUT folders")
    unique = [group[0] for group in by_label.values()]
    if len(unique) < len(items):
        log.warning("%d input(s) named more than once: each is segmented once",
                    len(items) - len(unique))
    return unique


def label_path(out: Path, rel: str) -> Path:
    """``out/labels/<rel without its extension>.png``."""
    return out / "labels" / (rel.rsplit(".", 1)[0] + ".png")


def overlay_path(out: Path, rel: str) -> Path:
    """``out/overlays/<rel without its extension>.png``."""
    return out / "overlays" / (rel.rsplit(".", 1)[0] + ".png")


def overlay_image(image: np.ndarray, labels: np.ndarray, palette: list[list[int]],
                  alpha: float = 0.5) -> np.ndarray:
    """Blend the class colours over the image: uint8 RGB [H, W, 3] from the image (uint8 RGB
    [H, W, 3]) and its label map (uint8 [H, W]).

    Every output value is ``uint8(v * (1 - alpha) + c * alpha)`` (float64, truncated) of an
    image value ``v`` and a colour value ``c``; the 256 x 256 possible results are tabulated
    once per ``alpha`` and looked up.
    """
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(palette)] = np.asarray(palette, np.uint8)[:256]
    colour = pal[labels]
    index = (np.asarray(image, np.uint8).astype(np.uint16) << 8) | colour
    return _blend_table(float(alpha)).ravel()[index]


@functools.lru_cache(maxsize=8)
def _blend_table(alpha: float) -> np.ndarray:
    """uint8 [256, 256]: entry [v, c] = ``uint8(v * (1 - alpha) + c * alpha)`` in float64."""
    v = np.arange(256, dtype=np.uint8)[:, None]
    c = np.arange(256, dtype=np.uint8)[None, :]
    return (v * (1 - alpha) + c * alpha).astype(np.uint8)


@dataclass
class JobReport:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    recovered: int = 0      # results.jsonl lines restored for finished label maps (resume)
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        lines = [f"images: {self.done} done, {self.skipped} skipped, {self.failed} failed "
                 f"in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s)"]
        if self.recovered:
            lines.append(f"results.jsonl: {self.recovered} line(s) restored for label maps "
                         "finished by an interrupted run")
        total = sum(self.stages.values()) or 1.0
        if self.stages:
            lines.append("time per stage (ms/image, share):")
            n = max(self.done, 1)
            for k, v in self.stages.items():
                lines.append(f"  {k:<16} {1000 * v / n:9.2f}  {100 * v / total:5.1f}%")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"done": self.done, "skipped": self.skipped, "failed": self.failed,
                "recovered": self.recovered,
                "seconds": self.seconds, "images_per_s": self.images_per_s,
                "stages_s": dict(self.stages)}


def explain_read_error(item: InputItem, exc: SpmlError) -> str:
    """The failed.txt message of an image that could not be read: a listed file that does not
    exist is named with the folder its list resolves against."""
    if item.listed_in is not None and not item.path.exists():
        return (f"not found: {item.path.absolute()} ({LIST_RULE}, "
                f"{item.listed_in.parent.absolute()})")
    return exc.message + (f"; fix: {exc.fix}" if exc.fix else "")


def read_item(item: InputItem, pp: PreprocessConfig | None = None) -> Read:
    """One input image read (and, with ``pp``, resized) like the job's reader threads do."""
    return read_one(item, pp, path_of=_item_path, explain=explain_read_error)


def read_items(items: list[InputItem], batch: int, pool: ThreadPoolExecutor,
               pp: PreprocessConfig | None = None) -> Iterator[list[Read]]:
    """Batches of input images read in ``pool``'s threads, one batch ahead of the consumer."""
    return read_batches(items, batch, pool, pp, path_of=_item_path, explain=explain_read_error)


def _item_path(item: InputItem) -> Path:
    return item.path


@dataclass
class JobPlan:
    """What a segment job has to do: the images still to segment, how many it names in all, and
    the report so far (skipped images, restored results lines)."""

    todo: list[InputItem]
    total: int
    report: JobReport


def plan_job(source: str | Path, out: Path, *, skip_existing: bool = False,
             only: list[str] | None = None, class_names: list[str] | tuple = ()) -> JobPlan:
    """List the images of ``source``, check the outputs (OUTPUT a folder, one label map per
    input), create ``out`` and, with ``skip_existing``, set aside the images whose label map is
    complete, restoring the ``results.jsonl`` line of any that lacks one (a job killed between
    the two writes). ``only``: optional list of file stems to keep (e.g. a dataset split)."""
    out = Path(out)
    items = discover(source)
    if only is not None:
        keep = set(only)
        items = [it for it in items if Path(it.rel).stem in keep]
    if not items:
        raise SpmlError("no images found", path=source,
                        fix=f"image extensions: {', '.join(IMAGE_EXTENSIONS)}")
    if out.exists() and not out.is_dir():
        raise SpmlError("OUTPUT exists and is not a folder", path=out,
                        fix="pass a folder for OUTPUT (it is created when missing)")
    items = check_unique_outputs(items, out)
    out.mkdir(parents=True, exist_ok=True)
    report = JobReport()
    todo, finished = [], []
    for it in items:
        if skip_existing and png_is_complete(label_path(out, it.rel)):
            report.skipped += 1
            finished.append(it)
        else:
            todo.append(it)
    results_path = out / "results.jsonl"
    recorded = _recorded_labels(results_path)
    lost = [it for it in finished if str(label_path(out, it.rel)) not in recorded
            and os.path.abspath(label_path(out, it.rel)) not in recorded]
    if lost:
        with open(results_path, "a") as f:
            for it in lost:
                record = _record(out, it, read_label_png(label_path(out, it.rel)),
                                 list(class_names), None)
                f.write(json.dumps(record) + "\n")
        report.recovered = len(lost)
    sweep_partial_files(out)
    return JobPlan(todo, len(items), report)


def sweep_partial_files(out: Path) -> int:
    """Remove the temporary files of atomic writes (``.<name>.<random>.tmp``) that a killed
    process left under ``out/labels`` and ``out/overlays``; returns how many. Only for a job's
    own OUTPUT folder, before or after its work (no other writer is then running)."""
    removed = 0
    for sub in ("labels", "overlays"):
        for tmp in (out / sub).rglob(".*.tmp") if (out / sub).is_dir() else ():
            try:
                tmp.unlink()
                removed += 1
            except OSError:
                pass
    if removed:
        log.info("removed %d partial file(s) left by an interrupted job in %s", removed, out)
    return removed


def run_segment_job(pipeline, source: str | Path, out: Path, *, batch: int = 4,
                    overlay: bool = False, skip_existing: bool = False,
                    progress: bool = True, only: list[str] | None = None) -> JobReport:
    """Segment every image of ``source`` into ``out`` with ``pipeline`` (a core Pipeline).

    ``only``: optional list of file stems to keep (e.g. a dataset split).
    """
    out = Path(out)
    plan = plan_job(source, out, skip_existing=skip_existing, only=only,
                    class_names=list(getattr(pipeline, "class_names", [])))
    report, todo = plan.report, plan.todo
    palette = pipeline.palette
    failed_lines: list[str] = []
    t_start = time.perf_counter()
    results_f = open(out / "results.jsonl", "a")
    bar = tqdm(total=plan.total, initial=report.skipped, desc="segment", unit="img",
               disable=not progress, dynamic_ncols=True)

    def fail(group: list[tuple[InputItem, np.ndarray]], message: str) -> None:
        for it, _ in group:
            failed_lines.append(f"{it.path}\t{message}")
        report.failed += len(group)
        bar.update(len(group))

    def collect(post: Future, group: list[tuple[InputItem, np.ndarray]], staged) -> None:
        """Take a finished batch: hand its label maps to the writers, record what is done."""
        try:
            outputs = post.result()
        except SpmlError as exc:
            fail(group, exc.message)
            return
        for key, v in staged.timings.items():
            report.stages[key] += v
        for (it, img), res in zip(group, outputs):
            writes.append(writers.submit(_write, out, it, img, res, palette, overlay))
        for w in [w for w in writes if w.done()]:
            _finish(w, results_f, report)
            writes.remove(w)
        results_f.flush()
        bar.update(len(group))

    writes: list[Future] = []
    try:
        threads = io_threads()
        # The network of batch i+1 (this thread) overlaps the classifier / walk / read-out of
        # batch i (the `post` thread) and the IO (reader and writer threads).
        with ThreadPoolExecutor(max_workers=threads) as readers, \
                ThreadPoolExecutor(max_workers=threads) as writers, \
                ThreadPoolExecutor(max_workers=1) as post_pool:
            pending = None                  # (future of finish, its batch, its staged batch)
            pp = getattr(pipeline, "pp", None)
            for group in read_items(todo, batch, readers, pp):
                good, resized = [], []
                for r in group:
                    report.stages["read+preprocess"] += r.seconds
                    if r.error is not None:
                        failed_lines.append(f"{r.item.path}\t{r.error}")
                        report.failed += 1
                        bar.update(1)
                    else:
                        good.append((r.item, r.image))
                        resized.append(r.resized)
                if not good:
                    continue
                try:
                    staged = pipeline.forward([img for _, img in good],
                                              resized if pp is not None else None)
                except SpmlError as exc:
                    fail(good, exc.message)
                    continue
                if pending is not None:
                    collect(*pending)
                pending = (post_pool.submit(pipeline.finish, staged), good, staged)
            if pending is not None:
                collect(*pending)
            for w in writes:
                _finish(w, results_f, report)
    finally:
        results_f.close()
        bar.close()
        if failed_lines:
            with open(out / "failed.txt", "a") as f:
                f.write("\n".join(failed_lines) + "\n")
        report.seconds = time.perf_counter() - t_start
    return report


def _write(out: Path, it: InputItem, image: np.ndarray, res, palette, overlay: bool) -> tuple[dict, float]:
    t = time.perf_counter()
    labels = res.labels
    if overlay:
        # zlib level 1: same pixels, ~3x faster to encode than the default level 6 for photos
        # (files ~15% larger); the overlay is a visual aid, the label map keeps the default.
        buf = io.BytesIO()
        Image.fromarray(overlay_image(image, labels, palette)).save(buf, format="PNG",
                                                                    compress_level=1)
        atomic_write_bytes(overlay_path(out, it.rel), buf.getvalue(), durable=False)
    # The label map last: it marks the image done for --skip-existing. No fsync: the rename
    # keeps a killed job from leaving half files, and --skip-existing redoes a label map that a
    # power loss left incomplete (png_is_complete).
    write_label_png(label_path(out, it.rel), labels, palette, durable=False)
    return _record(out, it, labels, res.class_names, res.timings), time.perf_counter() - t


def _record(out: Path, it: InputItem, labels: np.ndarray, names: list[str],
            timings: dict[str, float] | None) -> dict:
    """The results.jsonl line of one image from its label map (uint8 [H, W] class ids).
    ``timings`` None: the line is restored from a finished label map (``"restored": true``,
    no timings)."""
    counts = np.bincount(labels.ravel(), minlength=256)
    ids = np.flatnonzero(counts)
    record = {"path": str(it.path), "label": str(label_path(out, it.rel)),
              "size": [int(labels.shape[1]), int(labels.shape[0])],
              "classes": {names[i] if i < len(names) else str(i): int(counts[i]) for i in ids},
              "timings_ms": {k: round(1000 * v, 3) for k, v in (timings or {}).items()}}
    if timings is None:
        record["restored"] = True
    return record


def _recorded_labels(results_path: Path) -> set[str]:
    """Label paths (as written and absolute) that ``results.jsonl`` has a line for. A last line
    cut short by a kill is removed first (its image is restored or redone), so that the next
    line starts on a line of its own."""
    if not results_path.is_file():
        return set()
    data = results_path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(results_path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    labels: set[str] = set()
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            lab = json.loads(line).get("label")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(lab, str):
            labels.update((lab, os.path.abspath(lab)))
    return labels


def _finish(fut: Future, results_f, report: JobReport) -> None:
    record, dt = fut.result()
    report.stages["write"] += dt
    results_f.write(json.dumps(record) + "\n")
    report.done += 1
