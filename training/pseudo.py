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
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spml_deploy.artifacts import atomic_torch_save
from spml_deploy.config import VOID, RunConfig
from spml_deploy.data.imageio import read_image, read_label_png, write_label_png
from spml_deploy.engine.crf import crf_at_original
from spml_deploy.engine.index import ExactIndex, build_index
from spml_deploy.engine.preprocess import Prepared, labels_to_original, preprocess, valid_cells
from spml_deploy.engine.prototypes import resize_labels_nearest, segment_memory
from spml_deploy.engine.refine import normalize_score_map, random_walk, refine_labels

log = logging.getLogger(__name__)

MEMORY = "memory.npz"
OLD_MEMORY_INDEX = "memory_index.npz"   # runs of older versions: the index beside memory.npz
CLASSIFIER = "classifier.pt"


@torch.no_grad()
def embed(net, image: np.ndarray, cfg: RunConfig, device) -> tuple[list[torch.Tensor], Prepared,
                                                                   torch.Tensor]:
    """Unit embeddings of an image and of its mirror (flipped back): two [1, D, h, w] passes,
    the preprocessing meta and the valid (non-padding) mask [1, h, w] at stride 4."""
    x, prep = preprocess(image, cfg.preprocess)
    xt = torch.from_numpy(x)[None].to(device)
    e = net(torch.cat([xt, xt.flip(-1)]))
    phi = F.normalize(e, dim=1, eps=1e-12)
    passes = [phi[0:1], phi[1:2].flip(-1)]
    return passes, prep, valid_cells([prep], *phi.shape[-2:], phi.device)


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
    """Score map at stride 4 [1, C, h, w] -> random walk -> label map at the original size
    (through DenseCRF when ``crf_image``, the original image, is given)."""
    ph, pw = prep.padded_hw
    valid = valid_cells([prep], ph, pw, scores.device, stride=1)
    seg = cfg.segmentation
    if squarings is None:
        _, up = refine_labels(scores, passes, present, (ph, pw), valid=valid,
                              normalize_scores=normalize, beta=seg.rw_beta, alpha=seg.rw_alpha,
                              squarings=seg.rw_squarings, return_scores=True)
    else:  # Algorithm 2 round 2: one step M·T (no squaring)
        gh, gw = ph // 8, pw // 8
        m = F.interpolate(scores, size=(gh, gw), mode="bilinear", align_corners=False)
        gv = F.interpolate(valid[:, None].float(), size=(gh, gw), mode="area")[:, 0] >= 0.5
        m = normalize_score_map(m, present, gv)
        grid_phi = [F.normalize(F.interpolate(p, size=(gh, gw), mode="bilinear",
                                              align_corners=False), dim=1).flatten(2) for p in passes]
        walked = random_walk(m.flatten(2), grid_phi, method="dense", squarings=0,
                             beta=seg.rw_beta, alpha=seg.rw_alpha, valid=gv.flatten(1))
        up = F.interpolate(walked.view(m.shape), size=(ph, pw), mode="bilinear", align_corners=False)
    return _scores_to_labels(up[..., : prep.resized_hw[0], : prep.resized_hw[1]], prep, crf_image)


def _present(weak: np.ndarray, C: int, device) -> torch.Tensor:
    present = torch.zeros(1, C, dtype=torch.bool, device=device)
    ids = [int(v) for v in np.unique(weak) if v < C]
    present[0, ids] = True
    return present


@torch.no_grad()
def algorithm1(net, f0, items, cfg: RunConfig, C: int, out_dir: Path, device,
               progress: bool = True) -> list[tuple[Path, Path]]:
    """Pseudo labels for scribbles/points/boxes. ``items``: prepared training items."""
    f0.eval()
    pairs = []
    for it in tqdm(items, desc="pseudo labels (random walk)", disable=not progress, leave=False):
        dst = out_dir / f"{it.stem}.png"
        if not dst.is_file():
            image = read_image(it.image)
            passes, prep, _ = embed(net, image, cfg, device)
            probs = sum(torch.softmax(f0(p), dim=1) for p in passes) / len(passes)
            present = _present(read_label_png(it.label), C, device)
            write_label_png(dst, _walk_to_labels(probs, passes, prep, present, cfg,
                                                 crf_image=image if cfg.train.crf else None))
        pairs.append((it.image, dst))
    return pairs


@torch.no_grad()
def memory_from_labels(net, pairs: list[tuple[Path, Path]], cfg: RunConfig, device,
                       progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Spec 7.3 memory: k-means segments (test grid) of every image, majority-vote labels:
    (unit prototypes [segments, D] float32, labels [segments] int64)."""
    protos, labels = [], []
    for img_path, lab_path in tqdm(pairs, desc="prototype memory", disable=not progress, leave=False):
        image = read_image(img_path)
        passes, prep, valid = embed(net, image, cfg, device)
        lab = _label_on_grid(read_label_png(lab_path), prep, passes[0].shape[-2:], device)
        p, l, _ = segment_memory(passes[0], lab, valid, tuple(cfg.segmentation.test_grid),
                                 iters=cfg.segmentation.kmeans_iters)
        protos.append(p.float().cpu().numpy())
        labels.append(l.cpu().numpy())
    return np.concatenate(protos), np.concatenate(labels).astype(np.int64)


def _label_on_grid(label: np.ndarray, prep: Prepared, hw, device) -> torch.Tensor:
    """A label map of the original image -> the padded stride-4 grid (nearest; padding VOID)."""
    import cv2

    rh, rw = prep.resized_hw
    lab = cv2.resize(label, (rw, rh), interpolation=cv2.INTER_NEAREST)
    full = np.full(prep.padded_hw, VOID, np.uint8)
    full[:rh, :rw] = lab
    t = torch.from_numpy(full.astype(np.int64))[None].to(device)
    return resize_labels_nearest(t, tuple(hw))


@torch.no_grad()
def knn_propagate(net, pairs, memory: tuple[np.ndarray, np.ndarray], cfg: RunConfig, C: int,
                  present_of: dict[str, torch.Tensor], out_dir: Path, device,
                  progress: bool = True) -> list[tuple[Path, Path]]:
    """Algorithm 2 step 3: soft kNN votes of each image's segments, per-class max(., 0.15)
    normalisation of present classes, argmax -> ``out_dir/<stem>.png``. ``memory``:
    (prototypes [n, D], labels [n]), indexed once for all images (exact search)."""
    index = ExactIndex.of(memory[0], memory[1], device=device)
    out = []
    for img_path, lab_path in tqdm(pairs, desc="kNN propagation", disable=not progress, leave=False):
        stem = Path(lab_path).stem
        dst = out_dir / f"{stem}.png"
        if not dst.is_file():
            image = read_image(img_path)
            passes, prep, valid = embed(net, image, cfg, device)
            q, _, _, pix = segment_memory(passes[0], None, valid, tuple(cfg.segmentation.test_grid),
                                          iters=cfg.segmentation.kmeans_iters, return_index=True)
            dist = index.vote(q, cfg.segmentation.knn_k, C, soft=True)                  # [M, C]
            smap = dist[pix.clamp_min(0)].permute(0, 3, 1, 2) * (pix >= 0)[:, None]      # [1,C,h,w]
            smap = F.interpolate(smap.float(), size=prep.padded_hw, mode="bilinear", align_corners=False)
            smap = smap[..., : prep.resized_hw[0], : prep.resized_hw[1]]
            peak = smap.flatten(2).amax(2).clamp_min(0.15)
            present = present_of[stem]
            denom = torch.where(present, peak, torch.ones_like(peak))
            write_label_png(dst, _scores_to_labels(smap / denom[..., None, None], prep,
                                                   image if cfg.train.crf else None))
        out.append((img_path, dst))
    return out


@torch.no_grad()
def cam_walk(net, cam_model, items, records_by_stem, cfg: RunConfig, C: int, out_dir: Path,
             device, progress: bool = True) -> list[tuple[Path, Path]]:
    """Algorithm 2 step 2: random walk on the CAM score map (bg = (1 - max CAM)^alpha)."""
    from spml_deploy.training.cam import compute_cams

    pairs = []
    for it in tqdm(items, desc="pseudo labels (CAM walk)", disable=not progress, leave=False):
        dst = out_dir / f"{it.stem}.png"
        if not dst.is_file():
            image = read_image(it.image)
            passes, prep, _ = embed(net, image, cfg, device)
            cams = compute_cams(cam_model, image, records_by_stem[it.stem], cfg.preprocess, device)
            fg = torch.from_numpy(cams).to(device)                                  # [C-1, H, W]
            bg = (1 - fg.amax(0, keepdim=True)).clamp_min(0) ** cfg.train.cam_alpha
            smap = torch.cat([bg, fg])[None]                                       # [1, C, H, W]
            import cv2

            rh, rw = prep.resized_hw
            s = torch.from_numpy(np.stack([cv2.resize(m, (rw, rh)) for m in smap[0].cpu().numpy()]))
            full = torch.zeros(1, C, *prep.padded_hw)
            full[0, :, :rh, :rw] = s
            write_label_png(dst, _walk_to_labels(full.to(device), passes, prep, None, cfg,
                                                 normalize=False,
                                                 crf_image=image if cfg.train.crf else None))
        pairs.append((it.image, dst))
    return pairs


@torch.no_grad()
def classifier_round2(net, f1, items, cfg: RunConfig, C: int, present_of, out_dir: Path, device,
                      progress: bool = True) -> list[tuple[Path, Path]]:
    """Algorithm 2 step 5: f1 softmax (flip-averaged), per-class max, absent 0, one walk step."""
    pairs = []
    for it in tqdm(items, desc="pseudo labels (round 2)", disable=not progress, leave=False):
        dst = out_dir / f"{it.stem}.png"
        if not dst.is_file():
            image = read_image(it.image)
            passes, prep, _ = embed(net, image, cfg, device)
            probs = sum(torch.softmax(f1(p), dim=1) for p in passes) / len(passes)
            write_label_png(dst, _walk_to_labels(probs, passes, prep, present_of[it.stem], cfg,
                                                 squarings=0))
        pairs.append((it.image, dst))
    return pairs


def finish_run(run_dir: Path, cfg: RunConfig, C: int, net, f0, items, records_by_stem, device,
               progress: bool = True) -> dict[str, str]:
    """Run the post-embedding stages; returns the files written (role -> relative path)."""

    run_dir = Path(run_dir)
    net.eval()
    f0.eval()
    sup = cfg.train.supervision
    iters = cfg.train.classifier_iters
    present_of = {it.stem: _present_tags(it.tags, C, device) for it in items}
    if sup == "tags":
        from spml_deploy.training.cam import load_cam_model

        cam_model = load_cam_model(run_dir / "cache" / "cam.pt", cfg.model, device)
        rw_pairs = cam_walk(net, cam_model, items, records_by_stem, cfg, C,
                            run_dir / "pseudo" / "round1-walk", device, progress)
        mem = memory_from_labels(net, rw_pairs, cfg, device, progress)
        nn_pairs = knn_propagate(net, rw_pairs, mem, cfg, C, present_of,
                                 run_dir / "pseudo" / "round1", device, progress)
        f1 = _classifier_stage(run_dir / "cache" / "f1.pt", net, nn_pairs, cfg, C, device, iters,
                               progress, "classifier f1")
        rw2 = classifier_round2(net, f1, items, cfg, C, present_of,
                                run_dir / "pseudo" / "round2-walk", device, progress)
        mem2 = memory_from_labels(net, rw2, cfg, device, progress)
        final_pairs = knn_propagate(net, rw2, mem2, cfg, C, present_of, run_dir / "pseudo" / "round2",
                                    device, progress)
        clf = _classifier_stage(run_dir / CLASSIFIER, net, final_pairs, cfg, C, device, iters,
                                progress, "classifier f2")
    else:
        final_pairs = algorithm1(net, f0, items, cfg, C, run_dir / "pseudo", device, progress)
        clf = _classifier_stage(run_dir / CLASSIFIER, net, final_pairs, cfg, C, device, iters,
                                progress, "classifier f1")
    del clf
    if not (run_dir / MEMORY).is_file():
        protos, labels = memory_from_labels(net, final_pairs, cfg, device, progress)
        build_index(protos, labels, cfg.segmentation.memory_index).save(run_dir / MEMORY)
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
    from spml_deploy.artifacts import load_weights
    from spml_deploy.engine.model import PixelClassifier
    from spml_deploy.training.classifier import STANDALONE_DROPOUT, train_classifier

    if path.is_file():
        clf = PixelClassifier(cfg.model.embed_dim, C, STANDALONE_DROPOUT)
        clf.load_state_dict(load_weights(path)["f1"])
        return clf.to(device).eval()
    clf = train_classifier(net, pairs, cfg, C, device, iters, cfg.train.seed, progress, desc)
    atomic_torch_save({"f1": clf.state_dict()}, path)
    return clf
