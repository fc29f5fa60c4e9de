"""THE image -> (embeddings, logits) stage: preprocessing, the network, optional flip averaging,
and reading images ahead in background threads.

Everything that needs the network's outputs for images goes through :class:`Engine`: the
segment job and the HTTP service (through :class:`spml_deploy.engine.pipeline.Pipeline`),
retrieval (index building and queries), the pseudo labels of training and the evaluation of a
network during training. ``model`` is any callable mapping normalised images [B, 3, H, W] to
(unit embeddings [B, D, H/4, W/4], logits [B, C, H/4, W/4]): a backend
(:mod:`spml_deploy.engine.backends`) or a :class:`spml_deploy.engine.model.SegmentationModel`.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from spml_deploy.config import PreprocessConfig
from spml_deploy.data.imageio import read_image
from spml_deploy.engine.preprocess import Prepared, prepare_batch, resize_for_network, valid_cells
from spml_deploy.errors import SpmlError

STRIDE = 4          # the network's outputs are at 1/4 of the input size
NORM_EPS = 1e-12


@dataclass
class Forward:
    """The network's outputs for a batch of images.

    ``passes``: one (unit embeddings [B, D, h, w], logits [B, C, h, w]) pair per pass -- the
    images, and with flip averaging their mirror images, whose outputs are flipped back so
    that every cell lines up with the unflipped pass. ``prepped``: where each image sits in the
    padded input [PH, PW] = ``padded_hw``; ``valid`` [B, h, w] bool: the cells inside the
    images (not padding); ``seconds``: time spent preparing the input and in the network.
    """

    prepped: list[Prepared]
    padded_hw: tuple[int, int]
    passes: list[tuple[torch.Tensor, torch.Tensor]]
    valid: torch.Tensor
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def phi(self) -> torch.Tensor:
        """Unit embeddings [B, D, h, w]: the single pass, or the normalised sum of the passes."""
        if len(self.passes) == 1:
            return self.passes[0][0]
        return F.normalize(sum(p for p, _ in self.passes), dim=1, eps=NORM_EPS)

    @property
    def logits(self) -> torch.Tensor:
        """Class logits [B, C, h, w]: the single pass, or the mean over the passes."""
        if len(self.passes) == 1:
            return self.passes[0][1]
        return sum(lg for _, lg in self.passes) / len(self.passes)

    @property
    def phis(self) -> list[torch.Tensor]:
        """The embeddings of every pass (for affinities averaged over passes)."""
        return [p for p, _ in self.passes]


class Engine:
    """Images -> :class:`Forward`: one implementation of the forward pass for every caller.

    ``model``: callable normalised images [B, 3, H, W] -> (unit embeddings, logits) at stride 4
    (a backend or a ``SegmentationModel``); ``pp``: the preprocessing the model was trained
    with; ``device``: where the input goes (default: ``model.device``, else the device of the
    model's first parameter, else the CPU).
    """

    def __init__(self, model: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 pp: PreprocessConfig, device: torch.device | str | None = None):
        self.model = model
        self.pp = pp
        if device is None:
            device = getattr(model, "device", None)
        if device is None and isinstance(model, torch.nn.Module):
            device = next(iter(model.parameters()), torch.empty(0)).device
        self.device = torch.device(device if device is not None else "cpu")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def run(self, images: Sequence[np.ndarray], *, flip: bool = False,
            resized: list[tuple[np.ndarray, Prepared]] | None = None,
            resize_on_device: bool | None = None) -> Forward:
        """The network's outputs for a batch of RGB uint8 images [H, W, 3] (any sizes).

        ``flip``: also run the mirrored input (the whole padded canvas, so every stride-4 cell
        maps back onto itself) as a second pass (spec 7.1-7.3 flip averaging). ``resized``: the
        images' :func:`resize_for_network` results when the caller has them (reader threads);
        ``resize_on_device`` (default: on CUDA) resizes on the device instead.
        """
        t0 = time.perf_counter()
        if resize_on_device is None:
            resize_on_device = self.device.type == "cuda"
        x, prepped = prepare_batch(list(images), self.pp, self.device, resized,
                                   resize_on_device=resize_on_device)
        self._sync()
        t1 = time.perf_counter()
        passes = [self.model(x)]
        if flip:
            phi_m, logits_m = self.model(x.flip(-1))
            passes.append((phi_m.flip(-1), logits_m.flip(-1)))
        self._sync()
        t2 = time.perf_counter()
        phi = passes[0][0]
        valid = valid_cells(prepped, *phi.shape[-2:], phi.device, STRIDE)
        return Forward(prepped, tuple(x.shape[-2:]), passes, valid,
                       {"read+preprocess": t1 - t0, "network": t2 - t1})

    def read_ahead(self, items: Sequence[Any], batch: int, *, path_of: Callable[[Any], Path]
                   = lambda it: Path(it), threads: int | None = None, resize: bool = True,
                   explain: Callable[[Any, SpmlError], str] | None = None
                   ) -> Iterator[list["Read"]]:
        """Batches of ``items`` read (decoded and, with ``resize``, resized for this engine's
        preprocessing) in background threads, one batch ahead of the consumer. A file that
        cannot be read gives a :class:`Read` with ``error`` set (``explain(item, exc)`` may
        word it) instead of stopping the stream."""
        with ThreadPoolExecutor(max_workers=threads or io_threads()) as pool:
            yield from read_batches(items, batch, pool, self.pp if resize else None,
                                    path_of=path_of, explain=explain)


@dataclass
class Read:
    """One image read by a reader thread: the decoded image (None on error), its
    :func:`resize_for_network` result when a preprocessing config was given, the error message
    and the seconds spent."""

    item: Any
    image: np.ndarray | None
    resized: tuple | None
    error: str | None
    seconds: float


def read_one(item: Any, pp: PreprocessConfig | None = None, *,
             path_of: Callable[[Any], Path] = lambda it: Path(it),
             explain: Callable[[Any, SpmlError], str] | None = None) -> Read:
    """Read and decode one image; with ``pp`` also resize it for the network. Errors are
    returned in :attr:`Read.error` (the message of a project error, with its fix), never
    raised: one bad file must not stop a batch job."""
    t = time.perf_counter()
    try:
        image = read_image(path_of(item))
        resized = resize_for_network(image, pp) if pp is not None else None
        return Read(item, image, resized, None, time.perf_counter() - t)
    except SpmlError as exc:
        if explain is not None:
            message = explain(item, exc)
        else:
            message = exc.message + (f"; fix: {exc.fix}" if exc.fix else "")
        return Read(item, None, None, message, time.perf_counter() - t)
    except Exception as exc:  # any decoder error: report it, keep going
        return Read(item, None, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t)


def read_batches(items: Sequence[Any], batch: int, pool: ThreadPoolExecutor,
                 pp: PreprocessConfig | None = None, *,
                 path_of: Callable[[Any], Path] = lambda it: Path(it),
                 explain: Callable[[Any, SpmlError], str] | None = None) -> Iterator[list[Read]]:
    """Read images in ``pool``'s threads, one batch ahead of the consumer."""
    chunks = [items[i:i + batch] for i in range(0, len(items), batch)]
    pending: list[list[Future]] = []
    for i, chunk in enumerate(chunks):
        pending.append([pool.submit(read_one, it, pp, path_of=path_of, explain=explain)
                        for it in chunk])
        if i >= 1:
            yield [f.result() for f in pending.pop(0)]
    while pending:
        yield [f.result() for f in pending.pop(0)]


def same_size_runs(reads: list[Read]) -> list[list[Read]]:
    """Consecutive reads whose network inputs have the same padded size, in order: one
    :meth:`Engine.run` per run keeps every image's outputs equal to those of the image alone
    (a batch pads its images to the largest one). Needs reads made with a preprocessing
    config (``Read.resized`` set)."""
    runs: list[list[Read]] = []
    for r in reads:
        if runs and runs[-1][0].resized[1].padded_hw == r.resized[1].padded_hw:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def io_threads() -> int:
    """Reader (or writer) threads: decoding and PNG encoding release the GIL, so they scale
    with the CPUs (a GPU job needs several to keep up with the network); 2 at least, 8 at most."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:          # not on Linux
        cpus = os.cpu_count() or 2
    return max(2, min(8, cpus // 2))
