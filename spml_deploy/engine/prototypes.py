"""Segments and their prototypes (spec 3.6, 7.3).

* :func:`resize_labels_nearest` brings label / region maps to the embedding grid exactly as
  ``torch.nn.functional.interpolate(mode="nearest")`` does (the official code's rule).
* :func:`form_segments` splits the k-means clusters of every image by (label, region):
  a segment is a maximal set of non-void pixels of one image with the same
  (k-means cluster, label, region).
* :func:`pool_prototypes` pools any per-pixel feature into unit segment prototypes
  (differentiable: gradients flow into every member pixel).
* :func:`majority_label` and :func:`segment_memory` build the label-free kNN memory of 7.3.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spml_deploy.config import VOID
from spml_deploy.errors import SpmlError
from spml_deploy.engine.kmeans import grid_init, kmeans_clusters, l2_normalize

__all__ = [
    "Segments",
    "resize_labels_nearest",
    "form_segments",
    "pool_prototypes",
    "majority_label",
    "segment_memory",
]


def _nearest_source_index(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """Source index of each output position for torch's "nearest" resize along one axis:
    ``min(floor(float32(o) * float32(n_in / n_out)), n_in - 1)`` (float32 arithmetic, as ATen;
    this differs from the exact ``floor(o * n_in / n_out)`` for some size pairs)."""
    if n_out == n_in:
        return torch.arange(n_out, device=device)
    scale = torch.tensor(float(n_in), dtype=torch.float32) / float(n_out)
    src = torch.floor(torch.arange(n_out, dtype=torch.float32) * scale).long()
    return src.clamp_(max=n_in - 1).to(device)


def resize_labels_nearest(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resize of integer maps (labels, regions, masks).

    ``labels``: [..., H, W] (typically [B, H, W]) of any dtype; ``size``: (h, w).
    Returns [..., h, w] with ``out[..., r, c] = labels[..., i(r), j(c)]`` where ``i``/``j`` are
    torch's nearest source indices (``floor(r * H / h)`` in float32; for an exact factor 4 that
    is pixel ``(4r, 4c)``, spec ``compat.nearest_subsample``). Matches
    ``F.interpolate(labels.float(), size, mode="nearest")`` on every size pair.
    """
    if labels.dim() < 2:
        raise SpmlError(f"resize_labels_nearest: labels must be [..., H, W], got shape {tuple(labels.shape)}",
                        fix="pass a 2-D or batched label map")
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise SpmlError(f"resize_labels_nearest: target size {size} must be positive",
                        fix="pass the embedding grid size (h, w)")
    rows = _nearest_source_index(labels.shape[-2], h, labels.device)
    cols = _nearest_source_index(labels.shape[-1], w, labels.device)
    return labels.index_select(-2, rows).index_select(-1, cols)


@dataclass
class Segments:
    """Segments of a batch of images (spec 3.6), ``S`` segments in all.

    Order: segments are sorted by (image, k-means cluster, label, region), so the segments of
    image ``b`` are contiguous and images appear in increasing order. This is the official
    order (image, cluster, label * divisor + region) as well.
    """

    index: Tensor    # [B, h, w] long: global segment id (row of the segment arrays), -1 at excluded pixels
    batch: Tensor    # [S] long: image of each segment
    cluster: Tensor  # [S] long: k-means cluster id within its image
    label: Tensor    # [S] long: label (class id, or an unlabelled code >= C)
    region: Tensor   # [S] long: over-segmentation region id
    count: Tensor    # [S] long: pixels per segment (>= 1)

    @property
    def num_segments(self) -> int:
        """Number of segments ``S``."""
        return int(self.batch.shape[0])


def form_segments(clusters: Tensor, labels: Tensor, regions: Tensor, void: int = VOID) -> Segments:
    """Unique (image, cluster, label, region) over the kept pixels of a batch (spec 3.6).

    ``clusters``: [B, h, w] k-means ids (-1 = not clustered), ``labels``: [B, h, w] weak labels,
    ``regions``: [B, h, w] over-segmentation ids (>= 0), all at the embedding resolution.
    A pixel is kept iff ``labels != void`` and ``clusters >= 0``. Segments of different images
    never merge (the image is part of the key). Order: see :class:`Segments`.
    """
    if not (clusters.shape == labels.shape == regions.shape) or clusters.dim() != 3:
        raise SpmlError("form_segments: clusters, labels and regions must all be [B, h, w]; got "
                        f"{tuple(clusters.shape)}, {tuple(labels.shape)}, {tuple(regions.shape)}",
                        fix="resize labels and regions to the embedding grid first")
    device = clusters.device
    b = clusters.shape[0]
    kept = (labels != void) & (clusters >= 0)
    img = torch.arange(b, device=device).view(b, 1, 1).expand_as(clusters)[kept]
    cl, lab, reg = clusters[kept].long(), labels[kept].long(), regions[kept].long()
    if cl.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Segments(torch.full_like(clusters, -1, dtype=torch.long), empty, empty.clone(),
                        empty.clone(), empty.clone(), empty.clone())
    stats = torch.stack([cl.max(), lab.max(), reg.max(), lab.min(), reg.min()]).tolist()
    max_c, max_l, max_r, min_l, min_r = (int(v) for v in stats)
    if min_l < 0 or min_r < 0:
        raise SpmlError(f"form_segments: negative label ({min_l}) or region ({min_r}) id on a kept pixel",
                        fix="encode unlabelled pixels with a code >= C and regions as ids >= 0")
    n_c, n_l, n_r = max_c + 1, max_l + 1, max_r + 1
    assert b * n_c * n_l * n_r < 2 ** 62, "segment key overflow"
    key = ((img * n_c + cl) * n_l + lab) * n_r + reg
    uniq, inverse, count = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
    index = torch.full(clusters.shape, -1, dtype=torch.long, device=device)
    index[kept] = inverse
    region = uniq % n_r
    rest = uniq // n_r
    label = rest % n_l
    rest = rest // n_l
    return Segments(index=index, batch=rest // n_c, cluster=rest % n_c, label=label,
                    region=region, count=count)


def pool_prototypes(features: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Unit prototypes ``normalize(sum_{i in s} f_i)`` (norm floor 1e-12) of every segment.

    ``features``: [B, F, h, w] with ``index`` [B, h, w], or [N, F] with ``index`` [N];
    ``index``: segment id per pixel in [0, num_segments), -1 = ignored.
    Returns [num_segments, F] in the dtype of ``features``; differentiable with respect to
    ``features`` (a segment with no pixel gets the zero vector). On CUDA the sum uses atomic
    adds (order-dependent rounding) unless deterministic algorithms are enabled.
    """
    if features.dim() == 4:
        bsz, f, h, w = features.shape
        if index.shape != (bsz, h, w):
            raise SpmlError(f"pool_prototypes: index has shape {tuple(index.shape)}, expected {(bsz, h, w)}",
                            fix="pass the per-pixel segment map of the same feature grid")
        flat = features.permute(0, 2, 3, 1).reshape(bsz * h * w, f)
    elif features.dim() == 2:
        if index.shape != features.shape[:1]:
            raise SpmlError(f"pool_prototypes: index has shape {tuple(index.shape)}, expected "
                            f"({features.shape[0]},)", fix="give one segment id per feature row")
        flat = features
    else:
        raise SpmlError(f"pool_prototypes: features must be [B, F, h, w] or [N, F], got {tuple(features.shape)}",
                        fix="pass an NCHW feature map or a matrix of per-pixel features")
    s = int(num_segments)
    idx = index.reshape(-1).long()
    idx = torch.where(idx >= 0, idx, s)            # ignored pixels go to a discarded row
    sums = flat.new_zeros(s + 1, flat.shape[1]).index_add(0, idx, flat)
    return l2_normalize(sums[:s], dim=1)


def majority_label(labels: Tensor, clusters: Tensor, num_clusters: int,
                   num_labels: int | None = None) -> Tensor:
    """Most frequent label per cluster (spec 7.3), ties -> smallest label.

    ``labels``, ``clusters``: integer tensors of the same shape (any); cluster ids in
    [0, num_clusters), -1 = pixel ignored; labels >= 0 (VOID = 255 is a candidate like any
    other value). ``num_labels``: labels considered are 0..num_labels-1 (default max + 1).
    Returns LongTensor [num_clusters]; -1 for a cluster without pixels.
    """
    if labels.shape != clusters.shape:
        raise SpmlError(f"majority_label: labels {tuple(labels.shape)} and clusters {tuple(clusters.shape)} differ",
                        fix="pass one label and one cluster id per pixel")
    k = int(num_clusters)
    lab = labels.reshape(-1).long()
    cl = clusters.reshape(-1).long()
    kept = cl >= 0
    if num_labels is None:
        num_labels = int(torch.where(kept, lab, 0).max()) + 1 if lab.numel() else 1
    n_l = int(num_labels)
    bad = kept & ((lab < 0) | (lab >= n_l) | (cl >= k))
    if bool(bad.any()):
        raise SpmlError(f"majority_label: a pixel has a label outside [0, {n_l}) or a cluster >= {k}",
                        fix="raise num_labels / num_clusters or mark the pixel's cluster -1")
    key = torch.where(kept, cl * n_l + lab, k * n_l)
    counts = torch.bincount(key, minlength=k * n_l + 1)[: k * n_l].view(k, n_l)
    winner = counts.argmax(dim=1)                  # first maximum = smallest label on ties
    return torch.where(counts.sum(dim=1) > 0, winner, -1)


@torch.no_grad()
def segment_memory(phi: Tensor, labels: Tensor | None, valid: Tensor | None,
                   grid: tuple[int, int], iters: int = 10, void: int = VOID,
                   return_index: bool = False, zero_centroid_for_empty: bool = True):
    """kNN memory entries of a batch at one scale (spec 7.3); no gradient.

    ``phi``: embeddings [B, D, h, w] (normalised here); ``labels``: [B, h, w] label map or None
    (query side); ``valid``: bool [B, h, w] non-padding pixels (None = all); ``grid``: (ky, kx).
    K-means without labels on the valid pixels; per non-empty cluster the prototype
    ``normalize(sum phi)`` and (with labels) the majority label over the cluster's pixels (VOID
    a candidate); clusters whose label is ``void`` are dropped. Without labels every non-empty
    cluster is kept with label -1.
    Returns ``(prototypes [M, D], labels [M], batch [M])`` ordered by (image, cluster id); with
    ``return_index`` also the per-pixel row of the memory [B, h, w] (-1 = invalid or dropped).
    """
    if phi.dim() != 4:
        raise SpmlError(f"segment_memory: phi must be [B, D, h, w], got {tuple(phi.shape)}",
                        fix="pass the embedding map in NCHW layout")
    b, _, h, w = phi.shape
    if labels is not None and labels.shape != (b, h, w):
        raise SpmlError(f"segment_memory: labels have shape {tuple(labels.shape)}, expected {(b, h, w)}",
                        fix="resize the label map to the embedding resolution")
    k = int(grid_init(int(grid[0]), int(grid[1]), h, w).max()) + 1
    z = kmeans_clusters(phi, valid, grid, iters=iters, zero_centroid_for_empty=zero_centroid_for_empty)
    offset = (torch.arange(b, device=phi.device) * k).view(b, 1, 1)
    gid = torch.where(z >= 0, z + offset, -1)
    protos = pool_prototypes(l2_normalize(phi, dim=1), gid, b * k)
    counts = torch.bincount(torch.where(gid >= 0, gid, b * k).reshape(-1), minlength=b * k + 1)[: b * k]
    if labels is None:
        lab = torch.full((b * k,), -1, dtype=torch.long, device=phi.device)
        keep = counts > 0
    else:
        lab = majority_label(labels, gid, b * k)
        keep = (counts > 0) & (lab != void)
    rows = keep.nonzero().squeeze(1)
    out = (protos[rows], lab[rows], rows // k)
    if not return_index:
        return out
    remap = torch.full((b * k + 1,), -1, dtype=torch.long, device=phi.device)
    remap[rows] = torch.arange(rows.numel(), device=phi.device)
    return out + (remap[torch.where(gid >= 0, gid, b * k)],)
