"""Execution plans of the fused contrastive primitive: chunk sizes and group-sum strategy per
device (same values under every plan, up to float rounding)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from spml_deploy.training.losses.reference import MAX_CHUNK_ELEMENTS, chunk_rows

#: Default bound on the pixel x segment entries of one chunk of the fused path on the CPU (2^20:
#: 4 MiB per float32 buffer, so a chunk's work stays in cache; the two buffers are reused
#: across chunks); on other devices ``MAX_CHUNK_ELEMENTS`` applies. The chunk-size sweep that
#: chose it: ``benchmarks/results/loss_speed.md`` (section "CPU chunk size").
FUSED_CPU_CHUNK_ELEMENTS = 1 << 20

#: Off the CPU, up to this many groups the group sums are a matmul against the one-hot group
#: matrix (deterministic); otherwise (and on the CPU, where it is faster) ``index_add_``.
GROUP_MATMUL_MAX = 256

#: On CUDA a chunk holds up to this many pixel x segment entries (2^28: 1 GiB per float32 work
#: buffer, two buffers), bounded by :data:`FUSED_CUDA_MEMORY_FRACTION` of the free memory. The
#: co-occurrence term at crop 512 (131k pixels x 15.5k prototypes, 2e9 entries) is then ~8
#: chunks instead of ~120 of ``MAX_CHUNK_ELEMENTS``: the work is memory-bound elementwise
#: passes over the chunk plus matmuls, and each chunk costs ~20 kernel launches.
FUSED_CUDA_CHUNK_ELEMENTS = 1 << 28
FUSED_CUDA_MEMORY_FRACTION = 0.25

#: With one shared pool (B = 1) and up to this many groups, the gradient coefficients are
#: applied to the contiguous row range of each group (segments sorted by group) in place,
#: instead of gathering them into a second [P, c] buffer first (one fewer pass over the chunk).
GROUP_RANGES_MAX = 64

#: The bound shift (see :class:`FusedPlan`) is used while the largest possible logit
#: ``kappa * max|f| * max|m|`` stays below this: shifted exponentials are then >= exp(-80),
#: far from float32's subnormal range (exp(-87)), so no term loses precision.
BOUND_SHIFT_MAX = 40.0


@dataclass(frozen=True)
class FusedPlan:
    """How the fused primitive runs on a device (same values, up to float rounding).

    ``chunk_elements``: pixel x segment entries per chunk. ``group_matmul``: group sums by a
    one-hot matmul (else ``index_add_``; only up to ``GROUP_MATMUL_MAX`` groups).
    ``bound_shift``: shift each pixel's logits by the Cauchy-Schwarz bound
    ``kappa |f_i| max_s |m_s|`` (folded into the logit matmul as an extra column) instead of
    the row maximum, which saves two passes over the chunk (the maximum and the subtraction);
    the losses and gradients do not depend on the shift. ``group_ranges``: apply the gradient
    coefficients per contiguous group range (see ``GROUP_RANGES_MAX``; B = 1 only).
    """

    chunk_elements: int
    group_matmul: bool = False
    bound_shift: bool = False
    group_ranges: bool = False


def cuda_chunk_elements(device: torch.device) -> int:
    """Entries per chunk of the fused path on a CUDA device: ``FUSED_CUDA_CHUNK_ELEMENTS``,
    bounded by ``FUSED_CUDA_MEMORY_FRACTION`` of its free memory (two float32 buffers), and at
    least ``MAX_CHUNK_ELEMENTS``."""
    free, _ = torch.cuda.mem_get_info(device)
    fit = int(free * FUSED_CUDA_MEMORY_FRACTION) // (2 * 4)
    return max(MAX_CHUNK_ELEMENTS, min(FUSED_CUDA_CHUNK_ELEMENTS, fit))


def fused_plan(device: torch.device, num_groups: int, batch: int) -> FusedPlan:
    """The :class:`FusedPlan` for ``batch`` problems with ``num_groups`` groups on ``device``:
    on the CPU chunks of ``FUSED_CPU_CHUNK_ELEMENTS`` (cache-sized), ``index_add_`` group sums;
    on CUDA large chunks (:func:`cuda_chunk_elements`) and one-hot matmul group sums; on both
    the bound shift and (one shared pool) group ranges, which made the co-occurrence term's
    forward + backward faster on the CPU (``benchmarks/results/train_step_cpu.md``); elsewhere ``MAX_CHUNK_ELEMENTS`` and the
    one-hot matmul."""
    if device.type == "cpu":
        return FusedPlan(FUSED_CPU_CHUNK_ELEMENTS, bound_shift=True,
                         group_ranges=batch == 1 and num_groups <= GROUP_RANGES_MAX)
    matmul = num_groups <= GROUP_MATMUL_MAX
    if device.type == "cuda":
        return FusedPlan(cuda_chunk_elements(device), matmul, True,
                         batch == 1 and num_groups <= GROUP_RANGES_MAX)
    return FusedPlan(MAX_CHUNK_ELEMENTS, matmul)


def group_sums_by_matmul(device: torch.device, num_groups: int) -> bool:
    """Whether the fused path sums per group with a one-hot matmul (else ``index_add_``)."""
    return device.type != "cpu" and num_groups <= GROUP_MATMUL_MAX


def fused_chunk_rows(num_rows: int, num_cols: int, chunk_size: int | None,
                     device: torch.device, plan: FusedPlan | None = None) -> int:
    """Pixels per chunk of the fused path (``chunk_size`` if given, else from the plan)."""
    if chunk_size is not None:
        return chunk_rows(num_rows, num_cols, chunk_size)
    elements = (plan or fused_plan(device, 1, 1)).chunk_elements
    return max(1, min(num_rows, elements // max(1, num_cols)))
