"""Pseudo-label random walk and f1 budget on a fixed embedding (benchmarks/results/recipe_search.md).

    python benchmarks/walk_and_f1.py RUN DATASET walk   # Algorithm 1 pseudo labels (points) of the
                                                        # first 100 training images vs their masks,
                                                        # without the walk and with 0-6 squarings
    python benchmarks/walk_and_f1.py RUN DATASET f1     # f1 trained on the training masks for 200
                                                        # and 1000 iterations, val mIoU

RUN is a run or bundle folder with config.json and weights.pt (its f0 gives the score maps);
the test size is 128 px. One torch thread.
"""
import sys, json, time, torch
from dataclasses import replace
from pathlib import Path
torch.set_num_threads(1)
from spml_deploy.config import RunConfig, from_dict
from spml_deploy.engine.model import build_model
from spml_deploy.artifacts import load_weights
from spml_deploy.data.dataset import load_dataset, load_mask
from spml_deploy.evaluation.metrics import ConfusionMeter
from spml_deploy.training.train import evaluate_f0
from spml_deploy.training.classifier import train_classifier
from spml_deploy.training import pseudo
from spml_deploy.training.weak_labels import weak_label_map
run, data, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cfg = from_dict(RunConfig, json.load(open(run / "config.json")))
cfg = replace(cfg, preprocess=replace(cfg.preprocess, max_side=128))
net, f0 = build_model(cfg.model); w = load_weights(run / "weights.pt"); net.load_state_dict(w["net"]); f0.load_state_dict(w["f0"])
net.eval(); f0.eval()
ds = load_dataset(data); recs = ds.split("train"); dev = torch.device("cpu")
if what == "f1":
    pairs = [(Path(r.path), Path(data) / "masks" / (r.stem + ".png")) for r in recs]
    for iters, lr in [(200, 0.03), (1000, 0.03)]:
        c = replace(cfg, train=replace(cfg.train, lr=lr, batch=12))
        t = time.perf_counter()
        clf = train_classifier(net, pairs, c, ds.num_classes, dev, iters, 0, False)
        s = evaluate_f0(net, clf, ds, "val", cfg, dev)
        print(f"f1 on GT masks, {iters} its lr {lr}: val mIoU {100*s['miou']:.1f} ({time.perf_counter()-t:.0f} s)",
              " ".join(f"{c['name'][:5]}:{100*(c['iou'] or 0):.0f}" for c in s["per_class"]), flush=True)
else:
    C = ds.num_classes
    res = {}
    for sq in [None, 0, 1, 2, 3, 6]:
        m = ConfusionMeter(C)
        c = replace(cfg, segmentation=replace(cfg.segmentation, rw_squarings=sq if sq is not None else 0))
        by_path = {Path(r.path): r for r in recs[:100]}
        model = pseudo.SegmentationModel(net, f0)
        for seen in pseudo._passes(model, c, list(by_path), Path, dev, "walk", False):
            r = by_path[seen.item]
            image, gt = seen.image, load_mask(r)
            weak = weak_label_map(r, "points", C, c.train, strict=False)
            prep, probs = seen.prep, seen.mean_probs()
            if sq is None:   # no walk: argmax of f0 restricted to present classes
                present = pseudo._present(weak, C, dev)
                up = torch.nn.functional.interpolate(probs * present[..., None, None], size=prep.padded_hw, mode="bilinear", align_corners=False)
                lab = pseudo._scores_to_labels(up[..., :prep.resized_hw[0], :prep.resized_hw[1]], prep, None)
            else:
                lab = pseudo._walk_to_labels(probs, seen.phis, prep, pseudo._present(weak, C, dev), c)
            m.update(lab, gt)
        print(f"pseudo labels (points, f0 of the run), squarings {sq}: train mIoU {100*m.scores(ds.class_names).miou:.1f}", flush=True)
