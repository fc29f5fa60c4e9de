"""After the embedding: pseudo labels, the final classifier and the prototype memory (spec 7.4).

Stages, each resumable (its outputs are files in the run folder; a finished stage is skipped):

* ``pseudo``: pseudo label maps of the training images, ``pseudo/<stem>.png``.
  Scribbles, points, boxes — Algorithm 1: f0 probabilities averaged over {flip, no flip}, per-class
  max normalisation, classes absent from the weak labels zeroed, random walk, argmax.
  Tags — Algorithm 2: random walk on the CAM score map, then kNN propagation across images over
  segment prototypes; a second round uses f1 (one random-walk step) and trains f2.
* ``classifier``: f1 (f2 for tags) trained on the frozen embeddings (``classifier.pt``).
* ``memory``: k-means segments of the training images with majority-vote pseudo labels, saved as
  one prototype index file ``memory.npz`` (vectors, labels, ids = rows; type
  ``segmentation.memory_index``, default ``flat`` = exact) for kNN label retrieval (k = 20).
  Without FAISS installed the file is an exact torch index of the same format. Runs of older
  versions hold ``memory.npz`` (prototypes + labels) and ``memory_index.npz``:
  :func:`spml_deploy.engine.index.load_memory` reads both layouts.
DenseCRF (spec 7.5) is applied where the spec puts it -- after the random walk of Algorithm 1
and of Algorithm 2's CAM walk, and after the soft kNN vote -- only with ``train.crf`` (it needs
the optional ``pydensecrf2`` package; see :mod:`spml_deploy.engine.crf`). Round 2's one-step walk has
no CRF (spec 7.4, Algorithm 2 step 5).

One driver (:func:`_passes`) runs every pass over the training images: images read ahead in
threads, same-size images batched through the one forward stage
(:class:`spml_deploy.engine.forward.Engine`, flip passes), then each image's work. A pass does
all the work that needs the same embedding, so each image is embedded once per pass:
scribbles/points/boxes take one pass (pseudo label, and with it the image's memory prototypes);
tags take three (round 1: CAM walk, memory and segments; round 2: f1 walk, memory and segments;
the final memory), the kNN propagation reusing the segments of its pass.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spml_deploy.artifacts import atomic_torch_save, load_weights
from spml_deploy.config import VOID, RunConfig
from spml_deploy.data.imageio import read_image, read_label_png, write_label_png
from spml_deploy.data.kinds import kind
from spml_deploy.engine.crf import crf_at_original
from spml_deploy.engine.forward import Engine, same_size_runs
from spml_deploy.engine.index import ExactIndex, build_index
from spml_deploy.engine.model import PixelClassifier, SegmentationModel
from spml_deploy.engine.preprocess import Prepared, labels_to_original, valid_cells
from spml_deploy.engine.prototypes import resize_labels_nearest, segment_memory
from spml_deploy.engine.refine import refine_labels
from spml_deploy.errors import TrainingError
from spml_deploy.training.cam import compute_cams, load_cam_model
from spml_deploy.training.classifier import STANDALONE_DROPOUT, train_classifier

log = logging.getLogger(__name__)

MEMORY = "memory.npz"
OLD_MEMORY_INDEX = "memory_index.npz"   # runs of older versions: the index beside memory.npz
CLASSIFIER = "classifier.pt"
PASS_BATCH = 8          # images per network call in a pass


# --------------------------------------------------------------------------------------------
# the driver: each image's network outputs, once per pass


@dataclass
class Seen:
    """One training image in a pass: the decoded image, where it sits in the network input,
    its (unit embeddings [1, D, h, w], logits [1, C, h, w]) for the image and for its mirror
    image (flipped back), and its valid (non-padding) cells [1, h, w]."""

    item: Any
    image: np.ndarray
    prep: Prepared
    passes: list[tuple[torch.Tensor, torch.Tensor]]
    valid: torch.Tensor

    @property
    def phis(self) -> list[torch.Tensor]:
        return [p for p, _ in self.passes]

    def mean_probs(self) -> torch.Tensor:
        """Softmax of the logits averaged over the two passes [1, C, h, w] (spec 7.4)."""
        return sum(torch.softmax(lg, dim=1) for _, lg in self.passes) / len(self.passes)


def _passes(model: torch.nn.Module, cfg: RunConfig, items: list, path_of: Callable[[Any], Path],
            device, desc: str, progress: bool) -> Iterator[Seen]:
    """Every item's :class:`Seen`, in order: read ahead in threads, runs of same-size images
    batched (the padding of a batch never changes an image's outputs), flip passes."""
    engine = Engine(model.eval(), cfg.preprocess, device)
    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False)
    try:
        for group in engine.read_ahead(items, PASS_BATCH, path_of=path_of):
            for r in group:
                if r.error is not None:
                    raise TrainingError(f"cannot read a training image: {r.error}",
                                        path=path_of(r.item),
                                        fix="run 'spml-deploy data check --deep' on the dataset")
            for run in same_size_runs(group):
                fw = engine.run([r.image for r in run], flip=True,
                                resized=[r.resized for r in run])
                for i, r in enumerate(run):
                    yield Seen(r.item, r.image, fw.prepped[i],
                               [(p[i:i + 1], lg[i:i + 1]) for p, lg in fw.passes],
                               fw.valid[i:i + 1])
                bar.update(len(run))
    finally:
        bar.close()


class _Memory:
    """Prototypes and majority labels of the k-means segments (test grid) of labelled images,
    collected image by image (spec 7.3); with ``keep_segments`` also every image's unlabelled
    segments (prototypes and the segment of every cell) for the kNN propagation."""

    def __init__(self, cfg: RunConfig, keep_segments: bool = False):
        self.grid = tuple(cfg.segmentation.test_grid)
        self.iters = cfg.segmentation.kmeans_iters
        self.protos: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.segments: dict[str, tuple[torch.Tensor, torch.Tensor, Prepared, Any]] = {}
        self.keep_segments = keep_segments

    def add(self, seen: Seen, label: np.ndarray, key: str) -> None:
        phi = seen.passes[0][0]
        lab = _label_on_grid(label, seen.prep, phi.shape[-2:], phi.device)
        p, lb, _ = segment_memory(phi, lab, seen.valid, self.grid, iters=self.iters)
        self.protos.append(p.float().cpu().numpy())
        self.labels.append(lb.cpu().numpy())
        if self.keep_segments:
            q, _, _, pix = segment_memory(phi, None, seen.valid, self.grid, iters=self.iters,
                                          return_index=True)
            self.segments[key] = (q.cpu(), pix.to(torch.int32).cpu(), seen.prep, seen.item)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.protos), np.concatenate(self.labels).astype(np.int64)


def _label_on_grid(label: np.ndarray, prep: Prepared, hw, device) -> torch.Tensor:
    """A label map of the original image -> the padded stride-4 grid (nearest; padding VOID)."""
    rh, rw = prep.resized_hw
    lab = cv2.resize(label, (rw, rh), interpolation=cv2.INTER_NEAREST)
    full = np.full(prep.padded_hw, VOID, np.uint8)
    full[:rh, :rw] = lab
    t = torch.from_numpy(full.astype(np.int64))[None].to(device)
    return resize_labels_nearest(t, tuple(hw))


# --------------------------------------------------------------------------------------------
# per-image read-outs


def _scores_to_labels(up: torch.Tensor, prep: Prepared, image: np.ndarray | None) -> np.ndarray:
    """Scores at the resized size [1, C, rh, rw] -> label map at the original size: argmax, or
    with ``image`` (the original RGB image) the argmax of the DenseCRF marginals
    (:func:`spml_deploy.engine.crf.crf_at_original`; the scores are used as given)."""
    if image is None:
        lab = up.argmax(1)[0].to(torch.uint8).cpu().numpy()
        return labels_to_original(lab, prep)
    return crf_at_original(image, up, prep).argmax(0).astype(np.uint8)


def _walk_to_labels(scores: torch.Tensor, passes: list[torch.Tensor], prep: Prepared,
                    present: torch.Tensor | None, cfg: RunConfig, normalize: bool = True,
                    squarings: int | None = None, crf_image: np.ndarray | None = None) -> np.ndarray:
    """Score map at stride 4 [1, C, h, w] -> random walk (:func:`refine_labels`; ``squarings``
    0 = Algorithm 2 round 2's one step M·T, dense) -> label map at the original size (through
    DenseCRF when ``crf_image``, the original image, is given)."""
    ph, pw = prep.padded_hw
    valid = valid_cells([prep], ph, pw, scores.device, stride=1)
    seg = cfg.segmentation
    one_step = squarings is not None
    _, up = refine_labels(scores, passes, present, (ph, pw), valid=valid,
                          normalize_scores=normalize, beta=seg.rw_beta, alpha=seg.rw_alpha,
                          squarings=squarings if one_step else seg.rw_squarings,
                          method="dense" if one_step else "auto", return_scores=True)
    return _scores_to_labels(up[..., : prep.resized_hw[0], : prep.resized_hw[1]], prep, crf_image)


def _present(weak: np.ndarray, C: int, device) -> torch.Tensor:
    present = torch.zeros(1, C, dtype=torch.bool, device=device)
    ids = [int(v) for v in np.unique(weak) if v < C]
    present[0, ids] = True
    return present


def _cam_scores(cam_model, seen: Seen, record, cfg: RunConfig, C: int, device) -> torch.Tensor:
    """Algorithm 2 step 2's score map on the padded input [1, C, PH, PW]: background
    (1 - max CAM)^alpha, then the CAMs, at the resized image's size (padding 0)."""
    cams = compute_cams(cam_model, seen.image, record, cfg.preprocess, device)
    fg = torch.from_numpy(cams).to(device)                                      # [C-1, H, W]
    bg = (1 - fg.amax(0, keepdim=True)).clamp_min(0) ** cfg.train.cam_alpha
    smap = torch.cat([bg, fg])[None]                                           # [1, C, H, W]
    rh, rw = seen.prep.resized_hw
    s = torch.from_numpy(np.stack([cv2.resize(m, (rw, rh)) for m in smap[0].cpu().numpy()]))
    full = torch.zeros(1, C, *seen.prep.padded_hw)
    full[0, :, :rh, :rw] = s
    return full.to(device)


# --------------------------------------------------------------------------------------------
# the stages


def _label_pass(model, items, cfg: RunConfig, out_dir: Path, device, progress: bool, desc: str,
                label_of: Callable[[Seen], np.ndarray], memory: _Memory | None
                ) -> list[tuple[Path, Path]]:
    """One pass writing ``out_dir/<stem>.png`` = ``label_of(seen)`` for every item that has none
    (an existing file is read instead: a resumed stage), each label also feeding ``memory``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    todo = items if memory is not None else [
        it for it in items if not (out_dir / f"{it.stem}.png").is_file()]
    for seen in _passes(model, cfg, todo, lambda it: Path(it.image), device, desc, progress):
        dst = out_dir / f"{seen.item.stem}.png"
        if dst.is_file():
            label = read_label_png(dst)
        else:
            label = label_of(seen)
            write_label_png(dst, label)
        if memory is not None:
            memory.add(seen, label, seen.item.stem)
    for it in items:
        pairs.append((Path(it.image), out_dir / f"{it.stem}.png"))
    return pairs


def _knn_pass(memory: _Memory, cfg: RunConfig, C: int, present_of: dict[str, torch.Tensor],
              out_dir: Path, device, progress: bool) -> list[tuple[Path, Path]]:
    """Algorithm 2 step 3 on the segments kept by ``memory``: soft kNN votes of each image's
    segments over the memory (searched through one prepared matrix), per-class max(., 0.15)
    normalisation of present classes, argmax -> ``out_dir/<stem>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index = ExactIndex.of(*memory.arrays(), device=device)       # indexed once for all images
    out = []
    for stem, (q, pix, prep, item) in tqdm(memory.segments.items(), desc="kNN propagation",
                                           disable=not progress, leave=False):
        dst = out_dir / f"{stem}.png"
        if not dst.is_file():
            pix = pix.to(device).long()
            dist = index.vote(q.to(device), cfg.segmentation.knn_k, C, soft=True)      # [M, C]
            smap = dist[pix.clamp_min(0)].permute(0, 3, 1, 2) * (pix >= 0)[:, None]  # [1,C,h,w]
            smap = F.interpolate(smap.float(), size=prep.padded_hw, mode="bilinear",
                                 align_corners=False)
            smap = smap[..., : prep.resized_hw[0], : prep.resized_hw[1]]
            peak = smap.flatten(2).amax(2).clamp_min(0.15)
            denom = torch.where(present_of[stem], peak, torch.ones_like(peak))
            image = read_image(item.image) if cfg.train.crf else None
            write_label_png(dst, _scores_to_labels(smap / denom[..., None, None], prep, image))
        out.append((Path(item.image), dst))
    return out


def _save_memory(run_dir: Path, cfg: RunConfig, protos: np.ndarray, labels: np.ndarray) -> None:
    build_index(protos, labels, cfg.segmentation.memory_index).save(run_dir / MEMORY)


def memory_from_labels(net, pairs: list[tuple[Path, Path]], cfg: RunConfig, device,
                       progress: bool = True, classifier: torch.nn.Module | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Spec 7.3 memory of (image, label PNG) pairs: k-means segments (test grid) of every image,
    majority-vote labels. One pass over ``net``'s embeddings; the engine's logits are not used,
    so ``classifier`` is any classifier of the run (default: a one-class stand-in)."""
    memory = _Memory(cfg)
    if classifier is None:
        classifier = PixelClassifier(cfg.model.embed_dim, 1).to(device)
    model = SegmentationModel(net, classifier)
    labels = dict(pairs)
    for seen in _passes(model, cfg, [p for p, _ in pairs], Path, device, "prototype memory",
                        progress):
        memory.add(seen, read_label_png(labels[seen.item]), str(seen.item))
    return memory.arrays()


def finish_run(run_dir: Path, cfg: RunConfig, C: int, net, f0, items, records_by_stem, device,
               progress: bool = True) -> dict[str, str]:
    """Run the post-embedding stages; returns the files written (role -> relative path)."""
    run_dir = Path(run_dir)
    net.eval()
    f0.eval()
    iters = cfg.train.classifier_iters
    crf = cfg.train.crf
    present_of = {it.stem: _present_tags(it.tags, C, device) for it in items}
    need_memory = not (run_dir / MEMORY).is_file()
    with_f0 = SegmentationModel(net, f0)
    if kind(cfg.train.supervision).image_level:     # Algorithm 2 (image tags)
        cam_model = load_cam_model(run_dir / "cache" / "cam.pt", cfg.model, device)

        def cam_walk(seen: Seen) -> np.ndarray:                 # Algorithm 2 step 2
            smap = _cam_scores(cam_model, seen, records_by_stem[seen.item.stem], cfg, C, device)
            return _walk_to_labels(smap, seen.phis, seen.prep, None, cfg, normalize=False,
                                   crf_image=seen.image if crf else None)

        mem1 = _Memory(cfg, keep_segments=True)
        _label_pass(with_f0, items, cfg, run_dir / "pseudo" / "round1-walk", device, progress,
                    "pseudo labels (CAM walk)", cam_walk, mem1)
        nn_pairs = _knn_pass(mem1, cfg, C, present_of, run_dir / "pseudo" / "round1", device,
                             progress)
        f1 = _classifier_stage(run_dir / "cache" / "f1.pt", net, nn_pairs, cfg, C, device, iters,
                               progress, "classifier f1")

        def f1_walk(seen: Seen) -> np.ndarray:                  # Algorithm 2 step 5
            return _walk_to_labels(seen.mean_probs(), seen.phis, seen.prep,
                                   present_of[seen.item.stem], cfg, squarings=0)

        mem2 = _Memory(cfg, keep_segments=True)
        _label_pass(SegmentationModel(net, f1), items, cfg, run_dir / "pseudo" / "round2-walk",
                    device, progress, "pseudo labels (round 2)", f1_walk, mem2)
        final_pairs = _knn_pass(mem2, cfg, C, present_of, run_dir / "pseudo" / "round2", device,
                                progress)
        _classifier_stage(run_dir / CLASSIFIER, net, final_pairs, cfg, C, device, iters,
                          progress, "classifier f2")
        if need_memory:
            _save_memory(run_dir, cfg, *memory_from_labels(net, final_pairs, cfg, device, progress,
                                                           classifier=f0))
    else:
        def algorithm1(seen: Seen) -> np.ndarray:
            present = _present(read_label_png(seen.item.label), C, device)
            return _walk_to_labels(seen.mean_probs(), seen.phis, seen.prep, present, cfg,
                                   crf_image=seen.image if crf else None)

        memory = _Memory(cfg) if need_memory else None
        final_pairs = _label_pass(with_f0, items, cfg, run_dir / "pseudo", device, progress,
                                  "pseudo labels (random walk)", algorithm1, memory)
        _classifier_stage(run_dir / CLASSIFIER, net, final_pairs, cfg, C, device, iters,
                          progress, "classifier f1")
        if memory is not None:
            _save_memory(run_dir, cfg, *memory.arrays())
    files = {"classifier": CLASSIFIER, "memory": MEMORY}
    if (run_dir / OLD_MEMORY_INDEX).is_file():     # a run of an older version, resumed
        files["memory_index"] = OLD_MEMORY_INDEX
    return files


def _present_tags(tags, C: int, device) -> torch.Tensor:
    present = torch.zeros(1, C, dtype=torch.bool, device=device)
    present[0, 0] = True
    present[0, [int(t) for t in tags]] = True
    return present


def _classifier_stage(path: Path, net, pairs, cfg, C, device, iters, progress, desc):
    if path.is_file():
        clf = PixelClassifier(cfg.model.embed_dim, C, STANDALONE_DROPOUT)
        clf.load_state_dict(load_weights(path)["f1"])
        return clf.to(device).eval()
    clf = train_classifier(net, pairs, cfg, C, device, iters, cfg.train.seed, progress, desc)
    atomic_torch_save({"f1": clf.state_dict()}, path)
    return clf
