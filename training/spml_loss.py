"""One training step's SPML loss (spec sections 3.6, 3.7, 5 and 10).

From the raw embeddings of a batch and its weak labels, regions and tags:

1. per-image spherical k-means on the non-void pixels (``spml_deploy.engine.kmeans``);
2. segments = unique (image, cluster, label, region) (``spml_deploy.engine.prototypes``), with
   differentiable prototypes ``mu_s = normalize(sum phi)`` and ``nu_s = normalize(sum psi)``;
3. the segment pool of the batch (all processes, :func:`gather_pool`) plus the detached memory
   bank of the previous iterations (:class:`MemoryBank`, relationships A, C and O only);
4. the four relationships: (I) image similarity, (A) annotation, (C) co-occurrence and
   (O) feature affinity, each a mean of the per-pixel primitive of ``training.losses``.

Label codes at the embedding resolution: ``0..C-1`` labelled, ``C..254`` unlabelled but used
(clustered, in I, C and O; spec pitfall 1), ``255`` void (dropped from everything).
``compat.unlabeled_as_void`` maps the unlabelled codes to void first (official data behaviour).
"""
from __future__ import annotations

import contextlib
import logging
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, Callable, ContextManager, Iterator, Literal

import torch
from torch import Tensor

from spml_deploy.config import VOID, CompatConfig, LossConfig, SegmentationConfig
from spml_deploy.errors import ConfigError, TrainingError
from spml_deploy.engine.kmeans import clustering_features, kmeans_clusters, l2_normalize, location_features
from spml_deploy.engine.prototypes import Segments, form_segments, pool_prototypes
from spml_deploy.training.affinity import affinity_features, propagate_labels
from spml_deploy.training.losses import (Impl, chunk_rows, contrastive_nll,
                                         grouped_contrastive_nll, run_chunked, segsort_plus_loss,
                                         set_segsort_loss)

log = logging.getLogger(__name__)

__all__ = ["SegmentPool", "MemoryBank", "gather_pool", "spml_losses", "image_similarity_loss",
           "AFFINITY_TOP_K", "AFFINITY_THRESHOLD", "AFFINITY_PHI_SCALE"]

#: Feature-affinity propagation settings of the official development code (spec 5.4).
AFFINITY_TOP_K = 1
AFFINITY_THRESHOLD = 0.95
AFFINITY_PHI_SCALE = 0.1


@dataclass
class SegmentPool:
    """Per-segment data of a pool of ``S`` segments (current iteration or memory).

    ``mu``: [S, D] unit prototypes of the embedding; ``label``: [S] long; ``tags``: [S, T] tags of
    the segment's image (column 0 = background, ignored); ``batch``: [S] long image ids.
    Optional: ``nu`` [S, F] prototypes of the clustering feature, ``region`` [S] long,
    ``prop`` [S, F'] propagation features (relationship O).
    """

    mu: Tensor
    label: Tensor
    tags: Tensor
    batch: Tensor
    nu: Tensor | None = None
    region: Tensor | None = None
    prop: Tensor | None = None

    def __len__(self) -> int:
        return int(self.mu.shape[0])

    def detach(self) -> "SegmentPool":
        """A copy with every tensor detached from the autograd graph."""
        return SegmentPool(**{f.name: None if getattr(self, f.name) is None
                              else getattr(self, f.name).detach() for f in fields(self)})

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "SegmentPool":
        """Move to ``device``; floating tensors also to ``dtype`` when given."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t is not None:
                t = t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point())
                         else t.dtype)
            out[f.name] = t
        return SegmentPool(**out)

    @staticmethod
    def cat(pools: list["SegmentPool"]) -> "SegmentPool":
        """Concatenate pools in order; an optional field is kept only if every pool has it."""
        out = {}
        for f in fields(SegmentPool):
            parts = [getattr(p, f.name) for p in pools]
            out[f.name] = None if any(t is None for t in parts) else torch.cat(parts)
        return SegmentPool(**out)


class MemoryBank:
    """FIFO of the detached segment pools of the last ``size`` iterations (spec 3.7).

    Pushed pools get fresh negative image ids (``-1, -2, ...``, one per pushed image), so memory
    image ids never coincide with current ones (``0..B-1``) or with each other (pitfall 8).
    """

    def __init__(self, size: int):
        if size < 0:
            raise ConfigError(f"memory size must be >= 0, got {size}",
                              fix="set segmentation.memory_size to 0 (off) or a positive number")
        self.size = int(size)
        self._entries: deque[SegmentPool] = deque()
        self._next_id = -1

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def push(self, pool: SegmentPool) -> None:
        """Append a detached copy of ``pool`` (dropping the oldest beyond ``size``)."""
        if self.size == 0:
            return
        pool = pool.detach()
        uniq, inverse = torch.unique(pool.batch, return_inverse=True)
        pool.batch = self._next_id - inverse
        self._next_id -= int(uniq.numel())
        self._entries.append(pool)
        while len(self._entries) > self.size:
            self._entries.popleft()

    def entries(self) -> SegmentPool | None:
        """All remembered segments concatenated, oldest first (None when empty)."""
        if not self._entries:
            return None
        return SegmentPool.cat(list(self._entries))

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "next_id": self._next_id,
                "entries": [{f.name: getattr(p, f.name) for f in fields(p)} for p in self._entries]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._entries = deque(SegmentPool(**e) for e in state["entries"][-self.size:]) \
            if self.size else deque()
        self._next_id = int(state["next_id"])


def gather_pool(local: SegmentPool, images_per_process: int = 0) -> tuple[SegmentPool, int]:
    """Gather the segment pools of all processes; returns ``(pool, offset)``.

    ``offset`` is the row of this process's first segment in the gathered pool (its pixels' own
    segments are ``offset + local id``). Segments never span processes (a segment lies in one
    image), so gathering normalised prototypes is exact; a multi-process version must
    all-gather every field (gradient kept on the local slice) and offset image ids by the rank's
    first image. On one process this is the identity; under torchrun it is
    :func:`spml_deploy.training.distributed.gather_segment_pool`.
    """
    from spml_deploy.training import distributed

    if distributed.active():
        return distributed.gather_segment_pool(local, images_per_process)
    return local, 0


# ----------------------------------------------------------------------------------------------
# relationship (I): per image, padded segments, batched over images


def _region_groups(pix_region: Tensor, seg_batch: Tensor, seg_region: Tensor, slot: Tensor,
                   b: int, smax: int) -> tuple[Tensor, Tensor, Tensor]:
    """Groups of relationship (I): the distinct regions of each image's segments.

    ``slot``: [S] position of each segment in the padded ``[B * Smax]`` layout. Returns the group
    of each padded column [B, Smax] (padding columns: the extra group ``Gmax``, in neither set),
    and the positive / negative groups of each pixel [B, N, Gmax + 1] (positive = same region).
    """
    device = seg_region.device
    span = int(seg_region.max()) + 1
    codes, gid = torch.unique(seg_batch * span + seg_region, return_inverse=True)  # sorted
    g_batch = codes // span
    g_count = torch.bincount(g_batch, minlength=b)
    g_start = torch.cumsum(g_count, 0) - g_count
    gmax = int(g_count.max())
    g_local = torch.arange(codes.numel(), device=device) - g_start[g_batch]
    g_slot = g_batch * (gmax + 1) + g_local
    g_region = torch.full((b * (gmax + 1),), -1, dtype=torch.long, device=device)
    g_region = g_region.index_copy(0, g_slot, codes % span).view(b, 1, gmax + 1)
    g_valid = g_region >= 0
    group = torch.full((b * smax,), gmax, dtype=torch.long, device=device)
    group = group.index_copy(0, slot, g_local[gid]).view(b, smax)
    pos = (pix_region.unsqueeze(2) == g_region) & g_valid
    return group, pos, g_valid & ~pos


def image_similarity_loss(
    feat: Tensor,
    kept: Tensor,
    own: Tensor,
    pix_region: Tensor,
    protos: Tensor,
    seg_batch: Tensor,
    seg_region: Tensor,
    kappa: float,
    *,
    subtractive: bool = False,
    chunk_size: int | None = None,
    checkpoint: bool = True,
    impl: Impl = "fused",
) -> Tensor:
    """Relationship (I): per image, pixels against that image's segments, positives = same region.

    ``feat``: [B, N, F] unit pixel features (N = h*w); ``kept``: [B, N] bool; ``own``: [B, N] long
    segment id (global, any value at non-kept pixels); ``pix_region``: [B, N] long (>= 0);
    ``protos``: [S, F] unit prototypes of the batch's segments, sorted by image (``seg_batch`` [S]
    non-decreasing in ``0..B-1``); ``seg_region``: [S] (>= 0). Segments are padded per image to
    ``[B, Smax]`` so that one ``bmm`` serves all images. Returns the mean over images with kept
    pixels of the per-image mean loss (a differentiable 0 when no pixel is kept).

    ``impl="fused"``: :func:`grouped_contrastive_nll` with the regions of each image as groups
    (padding columns in no group) and the two means as per-pixel weights; ``"generic"`` (or
    ``subtractive``): :func:`contrastive_nll` on explicit masks (``checkpoint`` applies there).
    """
    if impl not in ("fused", "generic"):
        raise ConfigError(f"unknown loss implementation '{impl}'", fix="use 'fused' or 'generic'")
    b, n, _ = feat.shape
    s = protos.shape[0]
    if s == 0 or not bool(kept.any()):
        return feat.sum() * 0.0 + protos.sum() * 0.0
    counts = torch.bincount(seg_batch, minlength=b)
    start = torch.cumsum(counts, 0) - counts
    smax = int(counts.max())
    local = torch.arange(s, device=protos.device) - start[seg_batch]
    slot = seg_batch * smax + local
    pad = protos.new_zeros(b * smax, protos.shape[1]).index_copy(0, slot, protos).view(b, smax, -1)
    own_local = torch.where(kept, own - start[:, None], torch.zeros_like(own)).clamp(0, smax - 1)
    if impl == "fused" and not subtractive:
        group, pos, neg = _region_groups(pix_region, seg_batch, seg_region.long(), slot, b, smax)
        npix = kept.sum(1, keepdim=True)
        n_img = (npix > 0).sum().clamp(min=1)
        weights = kept.to(feat.dtype) / (npix.clamp(min=1) * n_img).to(feat.dtype)
        return grouped_contrastive_nll(feat, pad, group, pos, own_local, kappa, neg,
                                       weights=weights, chunk_size=chunk_size)
    reg_pad = torch.full((b * smax,), -1, dtype=torch.long, device=protos.device)
    reg_pad = reg_pad.index_copy(0, slot, seg_region.long()).view(b, smax)
    valid_pad = torch.zeros(b * smax, dtype=torch.bool, device=protos.device)
    valid_pad = valid_pad.index_fill(0, slot, True).view(b, smax)
    # An image without segments has no kept pixel; give its (discarded) rows one valid zero
    # column so that they stay finite and cannot leak NaN into the backward pass.
    valid_pad[:, 0] |= counts == 0

    def chunk(f: Tensor, o: Tensor, r: Tensor, m: Tensor, rm: Tensor, vm: Tensor) -> Tensor:
        # rows are pixels (chunk), columns images: f [c, B, F], o/r [c, B]
        c = f.shape[0]
        logits = kappa * torch.bmm(f.transpose(0, 1), m.transpose(1, 2))   # [B, c, Smax]
        pos = r.t()[:, :, None] == rm[:, None, :]
        valid = vm[:, None, :].expand(b, c, smax)
        loss = contrastive_nll(logits.reshape(b * c, smax), pos.reshape(b * c, smax),
                               o.t().reshape(b * c), valid.reshape(b * c, smax),
                               subtractive=subtractive)
        return loss.view(b, c).t()

    step = chunk_rows(n, b * smax, chunk_size)
    per_pixel = run_chunked(chunk, (feat.transpose(0, 1), own_local.t(), pix_region.t()),
                             (pad, reg_pad, valid_pad), b * smax, step, checkpoint).t()  # [B, N]
    per_pixel = torch.where(kept, per_pixel, torch.zeros_like(per_pixel))
    npix = kept.sum(1)
    has = npix > 0
    per_image = per_pixel.sum(1)[has] / npix[has].to(per_pixel.dtype)
    return per_image.mean()


# ----------------------------------------------------------------------------------------------
# the step


def _zero(*ts: Tensor) -> Tensor:
    """A differentiable scalar 0 connected to ``ts``."""
    return sum(t.sum() * 0.0 for t in ts)


def spml_losses(
    phi_raw: Tensor,
    labels: Tensor,
    regions: Tensor,
    tags: Tensor,
    loss_cfg: LossConfig,
    seg_cfg: SegmentationConfig,
    compat: CompatConfig,
    memory: MemoryBank | None,
    num_classes: int,
    *,
    color: Tensor | None = None,
    image_similarity_features: Literal["psi", "phi"] = "psi",
    chunk_size: int | None = None,
    update_memory: bool = True,
    loss_impl: Impl = "fused",
    stage: Callable[[str], ContextManager[Any]] | None = None,
) -> dict[str, Any]:
    """The SPML losses of one iteration (spec 5), and the memory update (spec 3.7).

    ``phi_raw``: [B, D, h, w] raw network output (normalised here); ``labels``: [B, h, w] weak
    labels at the embedding resolution (``0..C-1``, unlabelled ``C..254``, void 255);
    ``regions``: [B, h, w] over-segmentation ids (>= 0); ``tags``: [B, T] multi-hot image tags
    with column 0 = background (ignored); ``memory``: bank of previous pools (None = none; it is
    read, then the current pool is pushed unless ``update_memory`` is False);
    ``color``: optional [B, 3, h, w] extra clustering channels (DensePose, spec 3.5);
    ``image_similarity_features``: ``psi`` (VOC: psi_i against nu_s) or ``phi`` (DensePose head);
    ``loss_impl``: ``fused`` (default) or ``generic`` implementation of the primitive
    (``training.losses``; same values), ``compat.subtractive_positive_sum`` always uses generic.
    ``stage``: optional context-manager factory wrapped around the parts of the computation
    (``kmeans``, ``pooling``, ``loss_fwd`` and inside it ``loss_fwd/I``, ``/A``, ``/C``, ``/O``);
    ``benchmarks/train_step.py`` times the step with it. None = no hook.

    Returns a dict: ``loss`` (lambda-weighted sum, scalar tensor), ``L_I``, ``L_A``, ``L_C``,
    ``L_O`` (unweighted scalar tensors; ``L_O`` is 0 unless lambda_O > 0 and
    ``compat.disable_feature_affinity`` is False), and the diagnostics ``num_segments``,
    ``num_memory``, ``num_pixels``, ``num_labelled_pixels`` (ints) and ``segments``
    (:class:`Segments`).
    """
    if phi_raw.dim() != 4:
        raise TrainingError(f"spml_losses: embeddings must be [B, D, h, w], got {tuple(phi_raw.shape)}")
    b, d, h, w = phi_raw.shape
    if labels.shape != (b, h, w) or regions.shape != (b, h, w):
        raise TrainingError(
            f"spml_losses: labels {tuple(labels.shape)} and regions {tuple(regions.shape)} must be "
            f"[{b}, {h}, {w}] (the embedding grid)",
            fix="resize them with spml_deploy.engine.prototypes.resize_labels_nearest first")
    if tags.dim() != 2 or tags.shape[0] != b:
        raise TrainingError(f"spml_losses: tags must be [B={b}, C], got {tuple(tags.shape)}")
    if image_similarity_features not in ("psi", "phi"):
        raise ConfigError(f"unknown image_similarity_features '{image_similarity_features}'",
                          fix="use 'psi' (VOC) or 'phi' (DensePose head)")
    C = int(num_classes)
    stage = stage or _no_stage
    with stage("kmeans"):
        labels = labels.long()
        regions = regions.long()
        if compat.unlabeled_as_void:
            labels = torch.where(labels >= C, torch.full_like(labels, VOID), labels)
        clusters = kmeans_clusters(phi_raw, labels != VOID, tuple(seg_cfg.train_grid),
                                   seg_cfg.kmeans_iters, extra=color,
                                   zero_centroid_for_empty=compat.zero_centroid_for_empty)
    with stage("pooling"):
        pool, current, segs, offset, mem, psi, phi, nu, mu, apply_o = _segment_pool(
            phi_raw, labels, regions, tags, clusters, memory, loss_cfg, compat, color)
    with stage("loss_fwd"):
        res = _relationship_losses(phi_raw, phi, psi, mu, nu, labels, regions, tags, segs, pool,
                                   offset, C, loss_cfg, compat, image_similarity_features,
                                   chunk_size, loss_impl, apply_o, stage)
        if memory is not None and update_memory:
            memory.push(current)
    res["num_memory"] = 0 if mem is None else len(mem)
    return res


@contextlib.contextmanager
def _no_stage(_name: str) -> Iterator[None]:
    yield


def _segment_pool(phi_raw: Tensor, labels: Tensor, regions: Tensor, tags: Tensor,
                  clusters: Tensor, memory: MemoryBank | None, loss_cfg: LossConfig,
                  compat: CompatConfig, color: Tensor | None):
    """Segments of the k-means clusters, their prototypes, the gathered pool (+ memory)."""
    b, _, h, w = phi_raw.shape
    phi = l2_normalize(phi_raw, dim=1)
    psi = clustering_features(phi_raw, color)
    segs: Segments = form_segments(clusters, labels, regions, void=VOID)
    s = segs.num_segments
    mu = pool_prototypes(phi, segs.index, s)
    nu = pool_prototypes(psi, segs.index, s)
    apply_o = loss_cfg.lambda_o > 0 and not compat.disable_feature_affinity
    prop = None
    if apply_o:
        loc = location_features(h, w, device=phi.device, dtype=phi.dtype).expand(b, 2, h, w)
        prop = pool_prototypes(affinity_features(phi.detach(), loc, color, AFFINITY_PHI_SCALE),
                               segs.index, s)
    seg_tags = tags[segs.batch]
    local = SegmentPool(mu=mu, label=segs.label, tags=seg_tags, batch=segs.batch, nu=nu,
                        region=segs.region, prop=prop)
    current, offset = gather_pool(local, b)
    mem = memory.entries() if memory is not None else None
    if mem is not None:
        mem = mem.to(phi.device, phi.dtype)
    pool = current if mem is None else SegmentPool.cat([current, mem])
    return pool, current, segs, offset, mem, psi, phi, nu, mu, apply_o


def _relationship_losses(phi_raw: Tensor, phi: Tensor, psi: Tensor, mu: Tensor, nu: Tensor,
                         labels: Tensor, regions: Tensor, tags: Tensor, segs: Segments,
                         pool: SegmentPool, offset: int, C: int, loss_cfg: LossConfig,
                         compat: CompatConfig, image_similarity_features: str,
                         chunk_size: int | None, loss_impl: Impl, apply_o: bool,
                         stage: Callable[[str], ContextManager[Any]]) -> dict[str, Any]:
    """The four relationships (spec 5.1-5.4) on the pool and their weighted sum."""
    b, d, h, w = phi.shape
    s = segs.num_segments
    # -- per-pixel data (kept pixels, image-major, row-major) ---------------------------------
    index = segs.index.reshape(-1)
    kept_flat = index >= 0
    own = index[kept_flat] + offset
    phi_pix = phi.permute(0, 2, 3, 1).reshape(b * h * w, d)[kept_flat]
    lab_pix = labels.reshape(-1)[kept_flat]
    batch_pix = torch.arange(b, device=phi.device).repeat_interleave(h * w)[kept_flat]
    sub = compat.subtractive_positive_sum
    zero = _zero(phi_raw)

    # (I) image similarity
    if image_similarity_features == "psi":
        feat_map, protos_i = psi, nu
    else:
        feat_map, protos_i = phi, mu
    with stage("loss_fwd/I"):
        L_I = image_similarity_loss(
            feat_map.flatten(2).transpose(1, 2), segs.index.reshape(b, h * w) >= 0,
            segs.index.reshape(b, h * w), regions.reshape(b, h * w), protos_i, segs.batch,
            segs.region, loss_cfg.kappa_i, subtractive=sub, chunk_size=chunk_size,
            impl=loss_impl)

    # (A) annotation: labelled pixels vs labelled segments (current + memory)
    lab_seg = (pool.label >= 0) & (pool.label < C)
    lab_px = lab_pix < C
    n_lab = int(lab_px.sum())
    with stage("loss_fwd/A"):
        if n_lab > 0:
            new_row = torch.cumsum(lab_seg.long(), 0) - 1
            L_A = segsort_plus_loss(phi_pix[lab_px], lab_pix[lab_px], new_row[own[lab_px]],
                                    pool.mu[lab_seg], pool.label[lab_seg], loss_cfg.kappa_a,
                                    subtractive=sub, chunk_size=chunk_size, impl=loss_impl)
        else:
            L_A = zero

    # (C) co-occurrence: all kept pixels vs all segments, foreground tags
    empty = "double_count" if compat.set_empty_tag_double_count else "skip"
    fg_tags = (tags[:, 1:] != 0)
    with stage("loss_fwd/C"):
        if own.numel() > 0:
            L_C = set_segsort_loss(phi_pix, fg_tags[batch_pix], own, pool.mu,
                                   pool.tags[:, 1:] != 0, loss_cfg.kappa_c, empty=empty,
                                   subtractive=sub, chunk_size=chunk_size, impl=loss_impl)
        else:
            L_C = zero

    # (O) feature affinity: propagated label sets
    L_O = zero
    if apply_o and own.numel() > 0:
        if pool.prop is None:
            raise TrainingError("feature affinity needs propagation features for every memory entry",
                                fix="clear the memory bank after enabling lambda_o")
        expanded = propagate_labels(pool.prop, pool.batch, pool.prop, pool.label, pool.batch, C,
                                    top_k=AFFINITY_TOP_K, threshold=AFFINITY_THRESHOLD,
                                    same_image=True, unknown="ones")
        with stage("loss_fwd/O"):
            L_O = set_segsort_loss(phi_pix, expanded[own], own, pool.mu, expanded,
                                   loss_cfg.kappa_o, empty=empty, subtractive=sub,
                                   chunk_size=chunk_size, impl=loss_impl)

    loss = (loss_cfg.lambda_i * L_I + loss_cfg.lambda_a * L_A + loss_cfg.lambda_c * L_C
            + (loss_cfg.lambda_o * L_O if apply_o else 0.0))
    return {"loss": loss, "L_I": L_I, "L_A": L_A, "L_C": L_C, "L_O": L_O,
            "num_segments": s, "num_pixels": int(own.numel()), "num_labelled_pixels": n_lab,
            "segments": segs}
