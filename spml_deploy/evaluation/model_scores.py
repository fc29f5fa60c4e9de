"""Scoring a model's own classifier on a dataset split (the validation of a training run).

The network's outputs come from the one forward stage (:class:`spml_deploy.engine.forward.Engine`,
images read ahead in threads, batched); each image's logits are brought to its original size
(bilinear to the padded input, padding cropped, bilinear to the original size), their argmax is
scored against the mask with the same confusion matrix as ``spml-deploy eval``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from spml_deploy.config import PreprocessConfig
from spml_deploy.data.dataset import Dataset, load_mask
from spml_deploy.engine.forward import Engine, same_size_runs
from spml_deploy.engine.preprocess import upsample_to_input
from spml_deploy.errors import DatasetError
from spml_deploy.evaluation.metrics import ConfusionMeter


@torch.no_grad()
def score_model(model: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                pp: PreprocessConfig, dataset: Dataset, split: str, *, batch: int = 8,
                device: torch.device | str | None = None) -> dict[str, Any]:
    """mIoU (and per-class scores, ``SegmentationScores.to_dict``) of the argmax of ``model``'s
    logits on the images of ``split`` that have a mask. ``model``: images -> (unit embeddings,
    logits), e.g. a ``SegmentationModel`` in eval mode or a backend."""
    engine = Engine(model, pp, device)
    records = [r for r in dataset.split(split) if r.mask_path is not None]
    meter = ConfusionMeter(dataset.num_classes)
    for group in engine.read_ahead(records, batch, path_of=lambda r: Path(r.path)):
        bad = [r for r in group if r.error is not None]
        if bad:
            raise DatasetError(f"cannot read {bad[0].item.path}: {bad[0].error}",
                               path=bad[0].item.path, fix="run 'spml-deploy data check --deep'")
        for run in same_size_runs(group):
            fw = engine.run([r.image for r in run], resized=[r.resized for r in run])
            for i, r in enumerate(run):
                prep = fw.prepped[i]
                logits = upsample_to_input(fw.logits[i:i + 1], prep)
                logits = F.interpolate(logits, size=prep.orig_hw, mode="bilinear",
                                       align_corners=False)[0]
                meter.update(logits.argmax(0).cpu().numpy(), load_mask(r.item))
    return meter.scores(dataset.class_names).to_dict()
