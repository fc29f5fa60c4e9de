"""Training-recipe comparison: how fast does a recipe reach a val mIoU on the built-in scenes?

Each recipe is a named set of ``--set`` overrides on top of the ``tiny`` preset. A recipe trains
``spml-deploy train DATASET --supervision full --baseline ce`` (or another supervision with
``--supervision``) for ``--iters`` iterations with validation every ``--val-every``, and the
script prints one Markdown row per recipe: iterations, wall time, seconds per iteration, the
val mIoU curve and the load average before/after (the machine is shared: compare s/it, not
wall time alone).

    python benchmarks/recipe_search.py scenes/ --out /tmp/recipes --iters 2000 \\
        --recipe old --recipe fpn_adamw --threads 1

Recipes are defined in ``RECIPES`` below; ``--recipe name:key=value,key=value`` adds overrides.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

# Overrides relative to the current tiny preset. "old" states the preset's own recipe
# explicitly (spec head: ASPP + bilinear x2, f0 dropout 0.75; SGD lr 0.03, poly, warm-up 100).
RECIPES: dict[str, dict[str, Any]] = {
    "preset": {},
    "old": {"model.decoder": "", "model.classifier_dropout": 0.75, "train.optimizer": "sgd",
            "train.lr": 0.03, "train.schedule": "poly", "train.warmup": 100},
    "old_adamw": {"model.decoder": "", "model.classifier_dropout": 0.75,
                  "train.optimizer": "adamw", "train.lr": 2e-4, "train.schedule": "cosine"},
    "fpn_sgd": {"model.decoder": "fpn", "model.classifier_dropout": 0.75, "train.optimizer": "sgd",
                "train.lr": 0.03, "train.schedule": "poly", "train.warmup": 100},
    "fpn_adamw": {"model.decoder": "fpn", "model.classifier_dropout": 0.75,
                  "train.optimizer": "adamw", "train.lr": 2e-4, "train.schedule": "cosine"},
}


def _parse(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, extra = spec.partition(":")
    base = dict(RECIPES.get(name.split("+")[0], {}))
    for item in filter(None, extra.split(",")):
        key, _, value = item.partition("=")
        try:
            base[key] = json.loads(value)
        except json.JSONDecodeError:
            base[key] = value
    return name + (f"[{extra}]" if extra else ""), base


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        sec, _, name = key.partition(".")
        out.setdefault(sec, {})[name] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--recipe", action="append", required=True)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--val-every", type=int, default=500)
    ap.add_argument("--supervision", default="full")
    ap.add_argument("--baseline", default="ce", help="'' for SPML")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--score-train", action="store_true",
                    help="also score the final network on its training split (overfitting check)")
    args = ap.parse_args()
    import torch

    from spml_deploy.config import RunConfig, from_dict
    from spml_deploy.data.dataset import load_dataset
    from spml_deploy.engine.bundle import load_bundle
    from spml_deploy.training.train import evaluate_f0, train

    if args.threads:
        torch.set_num_threads(args.threads)
    for spec in args.recipe:
        name, flat = _parse(spec)
        flat = {"train.iters": args.iters, "train.val_every": args.val_every,
                "train.baseline": args.baseline, "train.classifier_iters": 0,
                "train.ckpt_every": args.iters, **flat}
        run = args.out / name.replace("[", "_").replace("]", "").replace(",", "_").replace("=", "")
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        train(args.dataset, args.supervision, run, overrides=_nested(flat), progress=False,
              resume=(run / "config.json").is_file())
        wall = time.perf_counter() - t0
        log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        curve = ", ".join(f"{r['step']}: {100 * r['val_miou']:.1f}" for r in log if "val_miou" in r)
        rates = [r["it_s"] for r in log if "it_s" in r]
        s_it = 1.0 / rates[-1] if rates else float("nan")
        train_score = ""
        if args.score_train:
            model = load_bundle(run).segmentation_model()
            cfg = from_dict(RunConfig, json.loads((run / "config.json").read_text()))
            s = evaluate_f0(model.net, model.classifier, load_dataset(args.dataset),
                            cfg.train.train_split, cfg, "cpu")
            train_score = f" train {100 * s['miou']:.1f} |"
        print(f"| {name} | {args.iters} | {wall / 60:.1f} | {s_it:.3f} | {curve} | "
              f"{load0[0]:.1f} / {os.getloadavg()[0]:.1f} |{train_score}", flush=True)


if __name__ == "__main__":
    main()
