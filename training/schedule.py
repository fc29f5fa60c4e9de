"""The learning-rate schedule and the optimizer of every training loop (spec section 6).

All three loops (embedding network, classifier on frozen embeddings, CAM classifier) take their
optimizer from :func:`make_optimizer` and set their learning rate each step with
:meth:`LRSchedule.apply`: each parameter group gets ``lr_t * group['lr_mult']`` (the spec's
multipliers, carried by :func:`spml_deploy.engine.model.param_groups` and the CAM groups).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from spml_deploy.config import TrainConfig
from spml_deploy.errors import ConfigError

__all__ = ["DECAYS", "RAMPS", "POLY_POWER", "OPTIMIZERS", "LRSchedule", "make_optimizer"]

DECAYS = ("poly", "cosine")
RAMPS = ("capped", "linear")
POLY_POWER = 0.9
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class LRSchedule:
    """Warm-up then decay of the base learning rate over ``total`` steps.

    decay ``poly`` (spec 6): ``base * (1 - t/T)^0.9``; ``cosine``: ``base * (1 + cos(pi t/T)) / 2``
    (``t`` held below ``T``). Warm-up over the first ``warmup`` steps, ramp ``capped`` (spec 6):
    ``min(base * (0.1 (1 - t/W) + t/W), decayed)``, from a tenth of the base; ramp ``linear`` (the
    CAM classifier): ``base * (t + 1) / W``, the decay starting after it.
    """

    base: float
    total: int
    warmup: int = 0
    decay: str = "poly"
    ramp: str = "capped"

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ConfigError(f"unknown train.schedule '{self.decay}'",
                              fix=f"use one of {', '.join(DECAYS)}")
        if self.ramp not in RAMPS:
            raise ConfigError(f"unknown warm-up ramp '{self.ramp}'",
                              fix=f"use one of {', '.join(RAMPS)}")

    @classmethod
    def of(cls, train: TrainConfig) -> "LRSchedule":
        """The embedding network's schedule: ``train.lr``, ``iters``, ``warmup``, ``schedule``."""
        return cls(train.lr, train.iters, train.warmup, train.schedule)

    def at(self, step: int) -> float:
        """The learning rate (before the group multipliers) of step ``step`` (0-based)."""
        t, T, base, W = step, max(self.total, 1), self.base, self.warmup
        if self.ramp == "linear" and t < W:
            return base * ((t + 1) / W)
        if self.decay == "cosine":
            lr = base * 0.5 * (1.0 + math.cos(math.pi * min(t, T - 1) / T))
        else:
            lr = base * (1.0 - min(t, T - 1) / T) ** POLY_POWER
        if self.ramp == "capped" and t < W:
            lr = min(base * (0.1 * (1 - t / W) + t / W), lr)
        return lr

    def apply(self, opt: torch.optim.Optimizer, step: int) -> float:
        """Set every group's ``lr`` to the step's rate times its ``lr_mult`` (default 1)."""
        lr = self.at(step)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        return lr


def make_optimizer(groups: list[dict[str, Any]], train: TrainConfig,
                   name: str | None = None) -> torch.optim.Optimizer:
    """SGD with momentum (spec 6) or AdamW over ``groups``; ``name`` defaults to
    ``train.optimizer``. ``train.weight_decay`` applies to groups that set none themselves."""
    name = train.optimizer if name is None else name
    if name == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum,
                               weight_decay=train.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)
    raise ConfigError(f"unknown train.optimizer '{name}'",
                      fix=f"use one of {', '.join(OPTIMIZERS)}")
