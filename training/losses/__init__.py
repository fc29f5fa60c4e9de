"""The pixel-to-segment contrastive primitive of SPML (spec section 4), in the log domain.

For a pixel ``i`` with unit feature ``f_i`` and a pool of unit segment prototypes ``m_s``, the
logits are ``kappa * f_i . m_s``. The pool is split per pixel into positives ``P_i``, negatives
``N_i`` and excluded entries (neither). With ``P_i^- = P_i minus {own segment}``:

    L(i) = -log( sum_{P_i^-} E / (sum_{P_i^-} E + sum_{N_i} E) )   if P_i^- is non-empty
         = -log( E_own / (E_own + sum_{N_i} E) )                      otherwise

with ``E_s = exp(kappa f_i . m_s)``. Both sums are masked log-sum-exps sharing the row maximum as
shift (excluded entries are ``-inf`` before the exponential); the own segment leaves ``P_i`` by
index, never by subtraction. The numerator set is never empty (it holds at least the own
segment), so no row is all ``-inf`` and gradients stay finite; a pixel without negatives scores
exactly 0 (spec 5.3). When the own segment is *not* a positive (multi-label form with an all-zero
tag row) it lies in ``N_i`` and is therefore counted twice in the denominator, which is the
official behaviour (``compat.set_empty_tag_double_count``); the wrappers skip such pixels by
default.

``compat.subtractive_positive_sum`` is available as ``subtractive=True``: the official float form
``other = sum_{P_i} E - E_own`` in linear space with an ``other > 0`` test. It is ill-conditioned
when the own segment dominates (kappa 16 in float32); use it only to reproduce official numbers.

Two implementations give the same values (up to float rounding): ``impl="fused"`` (default;
:mod:`spml_deploy.training.losses.fused`, run under a per-device plan of
:mod:`spml_deploy.training.losses.plan`) and ``impl="generic"`` (and always with
``subtractive=True``; :mod:`spml_deploy.training.losses.reference`). The single-label and
multi-label losses that pick one are in :mod:`spml_deploy.training.losses.segsort`.

Both process pixels in chunks so that a ``[#pixels x #segments]`` matrix never exists for all
pixels at once.
"""
from __future__ import annotations

from spml_deploy.training.losses.fused import group_counts, grouped_contrastive_nll
from spml_deploy.training.losses.plan import FusedPlan, fused_chunk_rows, fused_plan
from spml_deploy.training.losses.reference import (EmptyMode, Impl, Reduction, chunk_rows,
                                                   contrastive_nll, reduce_losses, run_chunked)
from spml_deploy.training.losses.segsort import (reduction_weights, segsort_plus_loss,
                                                 set_segsort_loss)

__all__ = [
    "contrastive_nll",
    "grouped_contrastive_nll",
    "fused_chunk_rows",
    "fused_plan",
    "FusedPlan",
    "reduction_weights",
    "group_counts",
    "segsort_plus_loss",
    "set_segsort_loss",
    "chunk_rows",
    "run_chunked",
    "reduce_losses",
    "Reduction",
    "EmptyMode",
    "Impl",
]
