"""The training command: run folder contents, resume, errors, baselines (tiny model, CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spml_deploy.artifacts import load_weights, read_manifest
from spml_deploy.cli import main
from spml_deploy.config import preset
from spml_deploy.errors import ConfigError, TrainingError
from spml_deploy.data.synth import synthesize
from spml_deploy.training.train import train

FAST = {"train": {"iters": 4, "batch": 2, "crop": 64, "ckpt_every": 2, "log_every": 1,
                  "classifier_iters": 2}}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes") / "ds"
    synthesize(root, n_train=6, n_val=2, size=64, seed=3)
    return root


def _overrides(**train):
    o = json.loads(json.dumps(FAST))
    o["train"].update(train)
    return o


def test_train_writes_complete_run(scenes, tmp_path):
    run = tmp_path / "run"
    res = train(scenes, "points", run, overrides=_overrides(), progress=False)
    assert res["steps"] == 4
    for name in ("spml.json", "config.json", "weights.pt", "checkpoint.pt", "train_log.jsonl",
                 "classifier.pt", "memory.npz"):
        assert (run / name).is_file(), name
    m = read_manifest(run)              # verifies every listed file's sha256
    assert m.kind == "run" and m.classes[0] == "background" and len(m.classes) == 9
    assert set(m.files) >= {"weights", "config", "memory"}
    w = load_weights(run / "weights.pt")
    assert set(w) == {"net", "f0", "f1"}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["iters"] == 4 and cfg["train"]["supervision"] == "points"
    assert cfg["loss"]["lambda_i"] == 1.0          # paper value for points (spec section 8)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(np.isfinite(r[k]) for r in steps for k in ("L_I", "L_A", "L_C", "CE_f0"))
    # the memory: one prototype index file (FAISS flat where installed), id = row, with labels
    from spml_deploy.engine.index import ExactIndex, index_is_exact, load_index, topk_vote

    assert "memory_index" not in m.files
    index = load_index(run / "memory.npz")
    protos, labels = index.vectors(), index.labels
    assert protos.shape[1] == m.model.embed_dim and index_is_exact(index)
    assert np.array_equal(index.ids, np.arange(len(protos)))
    assert np.allclose(np.linalg.norm(protos, axis=1), 1, atol=1e-4)
    assert labels.min() >= 0 and labels.max() < 9
    scores, ids = index.search(protos, 1)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)       # each prototype finds itself
    sims = protos @ protos.T
    assert np.allclose(sims[np.arange(len(ids)), ids[:, 0]], sims.max(1), atol=1e-5)
    # segmenting with the kNN classifier votes over the memory by the exact search
    from spml_deploy.data.imageio import read_image
    from spml_deploy.engine.pipeline import PipelineOptions, load_pipeline

    images = [read_image(p) for p in sorted((scenes / "images").glob("val_*.png"))]
    pipe = load_pipeline(run, options=PipelineOptions(classifier="knn"))
    assert isinstance(pipe.memory, ExactIndex)
    q = protos[::3]
    assert torch.equal(pipe.memory.vote(q, 20, 9), topk_vote(q, protos, labels, 20, 9))
    assert all(p.labels.shape == im.shape[:2] for p, im in zip(pipe.predict(images), images))
    # a run whose memory file went missing gets it back on --resume, listed in the manifest
    (run / "memory.npz").unlink()
    train(scenes, "points", run, resume=True, progress=False)
    again = load_index(run / "memory.npz")
    assert again.ntotal == index.ntotal and np.array_equal(again.labels, labels)
    assert "memory" in read_manifest(run).files


def test_resume_continues_the_same_run(scenes, tmp_path):
    """Stopping after 2 steps and resuming gives the same weights as 4 uninterrupted steps."""
    full = tmp_path / "full"
    train(scenes, "points", full, overrides=_overrides(classifier_iters=0), progress=False)
    # an interrupted run: 2 steps written, then resumed to 4 with the same schedule
    part2 = tmp_path / "part2"
    train(scenes, "points", part2, overrides=_overrides(iters=2, classifier_iters=0),
          progress=False)
    cfg = json.loads((part2 / "config.json").read_text())
    cfg["train"]["iters"] = 4            # the interrupted run was meant to go to 4 steps
    (part2 / "config.json").write_text(json.dumps(cfg))
    train(scenes, "points", part2, resume=True, progress=False)
    a = load_weights(full / "checkpoint.pt")
    b = load_weights(part2 / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    for k in a["net"]:
        if a["net"][k].is_floating_point():
            # the learning-rate schedule depends on the total, identical here; batches depend on
            # (seed, step) only, so the resumed run retraces the uninterrupted one
            torch.testing.assert_close(a["net"][k], b["net"][k], rtol=1e-4, atol=1e-5)


def test_existing_run_needs_resume(scenes, tmp_path):
    run = tmp_path / "run"
    train(scenes, "points", run, overrides=_overrides(iters=1, classifier_iters=0), progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(scenes, "points", run, overrides=_overrides(iters=1), progress=False)


def test_unknown_memory_index_type_fails_before_training(scenes, tmp_path):
    o = _overrides()
    o["segmentation"] = {"memory_index": "lsh"}
    with pytest.raises(ConfigError, match="memory_index 'lsh'") as exc:
        train(scenes, "points", tmp_path / "run", overrides=o, progress=False)
    assert "flat" in exc.value.fix and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_missing_annotation_kind_names_what_exists(tmp_path, scenes):
    ds = tmp_path / "ds"
    import shutil

    shutil.copytree(scenes, ds)
    doc = json.loads((ds / "annotations.json").read_text())
    doc["annotations"] = [a for a in doc["annotations"] if "scribble" not in a]
    (ds / "annotations.json").write_text(json.dumps(doc))
    with pytest.raises(TrainingError, match="scribbles.*points"):
        train(ds, "scribbles", tmp_path / "run", overrides=_overrides(), progress=False)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(scenes, tmp_path, monkeypatch):
    from spml_deploy.training import train as train_mod

    run = tmp_path / "run"
    real = train_mod.Trainer.step

    def poisoned(self, batch, step):
        if step == 3:
            batch = dict(batch)
            batch["image"] = batch["image"] * float("nan")
        return real(self, batch, step)

    monkeypatch.setattr(train_mod.Trainer, "step", poisoned)
    with pytest.raises(TrainingError, match="step 3"):
        train(scenes, "points", run, overrides=_overrides(), progress=False)
    ck = load_weights(run / "checkpoint.pt")
    assert ck["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["net"].values() if v.is_floating_point())


def test_pce_baseline_trains_end_to_end(scenes, tmp_path):
    """The partial cross-entropy baseline trains with cross-entropy only, then goes through the
    same stages as SPML (pseudo labels of every training image, f1, prototype memory), so the
    two are compared with the same stages; the full-mask baseline stops after its network."""
    run = tmp_path / "pce"
    train(scenes, "points", run, overrides=_overrides(baseline="pce"), progress=False)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert all("CE" in r and "L_A" not in r for r in log if "loss" in r)
    assert set(load_weights(run / "weights.pt")) == {"net", "f0", "f1"}
    assert len(list((run / "pseudo").glob("*.png"))) == 6
    assert "memory" in read_manifest(run).files
    full = tmp_path / "ce"
    train(scenes, "full", full, overrides=_overrides(baseline="ce"), progress=False)
    assert set(load_weights(full / "weights.pt")) == {"net", "f0"}
    assert not (full / "pseudo").exists()


def test_cli_bad_config_key_suggests_the_closest(scenes, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", str(scenes), "--out", str(tmp_path / "r"), "--set", "loss.lamda_a=2"])
    assert exc.value.code == 2
    assert "lambda_a" in capsys.readouterr().err


def test_backbone_learning_rate_follows_pretraining():
    from dataclasses import replace

    from spml_deploy.training.train import Trainer, backbone_lr_mult

    cfg = preset("points", "tiny", 4)
    assert backbone_lr_mult(cfg) == 10.0                   # from scratch: the head's rate
    assert backbone_lr_mult(replace(cfg, train=replace(cfg.train, pretrained="w.pth"))) == 1.0
    assert backbone_lr_mult(replace(cfg, train=replace(cfg.train, backbone_lr_mult=2.0))) == 2.0
    trainer = Trainer(cfg, 4, torch.device("cpu"))
    mult = {g["name"]: g["lr_mult"] for g in trainer.opt.param_groups}
    assert mult["backbone.weight"] == 10.0 and mult["backbone.bias"] == 20.0
    assert mult["head.weight"] == 10.0 and isinstance(trainer.opt, torch.optim.SGD)


def test_adamw_optimizer_and_unknown_name(scenes, tmp_path):
    from dataclasses import replace

    from spml_deploy.training.train import Trainer

    cfg = preset("points", "tiny", 4)
    adam = Trainer(replace(cfg, train=replace(cfg.train, optimizer="adamw")), 4, torch.device("cpu"))
    assert isinstance(adam.opt, torch.optim.AdamW)
    with pytest.raises(ConfigError, match="optimizer"):
        Trainer(replace(cfg, train=replace(cfg.train, optimizer="lbfgs")), 4, torch.device("cpu"))
    run = tmp_path / "adam"
    train(scenes, "points", run, overrides=_overrides(optimizer="adamw"), progress=False)
    st = load_weights(run / "checkpoint.pt")
    assert st["step"] == 4 and "exp_avg" in str(st["optimizer"]["state"])


def test_tiny_run_lowers_the_loss(scenes, tmp_path):
    """40 SPML steps from points on the built-in scenes: the total loss (L_I + L_A + L_C + f0's
    CE) of the last 8 steps is clearly below that of the first 8 (measured: 5.3 -> 4.1)."""
    run = tmp_path / "lower"
    train(scenes, "points", run, progress=False,
          overrides=_overrides(iters=40, batch=4, log_every=1, classifier_iters=0, warmup=5))
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in log if "loss" in r]
    assert len(loss) == 40
    assert np.mean(loss[-8:]) < 0.9 * np.mean(loss[:8]), loss


@pytest.mark.parametrize("supervision", ["tags", "boxes"])
def test_cam_supervisions_run_every_stage(scenes, tmp_path, supervision):
    """Tags (Algorithm 2: CAM, CAM walk, kNN propagation, f1, round 2, f2) and boxes (box-CAM
    labels, Algorithm 1) end to end: every stage writes a pseudo label map of the image's size
    for every training image, the walks keep to the image's tags (plus background), and the run
    has its classifier and memory. With the optional CRF package, the tags run also applies
    DenseCRF (after the CAM walk and the kNN votes)."""
    from spml_deploy.engine.crf import crf_available
    from spml_deploy.data.dataset import load_dataset
    from spml_deploy.data.imageio import read_label_png

    crf = supervision == "tags" and crf_available()
    run = tmp_path / "run"
    res = train(scenes, supervision, run, progress=False,
                overrides=_overrides(cam_iters=2, crf=crf))
    assert res["steps"] == 4
    for name in ("classifier.pt", "memory.npz", "spml.json"):
        assert (run / name).is_file(), name
    ds = load_dataset(scenes)
    # every stage's label maps: pseudo/<stem>.png (boxes), pseudo/round{1,2}{,-walk}/ (tags)
    folders = sorted({p.parent for p in (run / "pseudo").rglob("*.png")})
    assert len(folders) == (4 if supervision == "tags" else 1), folders
    for folder in folders:
        for rec in ds.split("train"):
            lab = read_label_png(folder / f"{rec.stem}.png")
            assert lab.shape == (rec.height, rec.width)
            # walks keep to the tags; the kNN votes (round1/, round2/) divide absent classes by
            # 1 instead of zeroing them (spec 7.3), so other classes may appear there
            if supervision == "boxes" or folder.name.endswith("-walk"):
                assert set(np.unique(lab).tolist()) <= {0, *rec.tags}, (folder, rec.stem)
    assert json.loads((run / "config.json").read_text())["train"]["crf"] == crf


def test_full_mask_baseline_dropout():
    """train.ce_dropout sets f0's dropout in the full-mask baseline only (the tiny preset: 0, its
    f0 is the network's own output layer); SPML's f0 and the partial baseline keep
    model.classifier_dropout, and a stored config without the key (-1) keeps it too."""
    from dataclasses import replace

    from spml_deploy.training.train import Trainer

    cfg = preset("full", "tiny", 4)
    assert cfg.train.ce_dropout == 0.0 and cfg.model.classifier_dropout == 0.75
    p = {b: Trainer(replace(cfg, train=replace(cfg.train, baseline=b)), 4,
                    torch.device("cpu")).f0.dropout.p for b in ("", "pce", "ce")}
    assert p == {"": 0.75, "pce": 0.75, "ce": 0.0}
    old = replace(cfg, train=replace(cfg.train, baseline="ce", ce_dropout=-1.0))
    assert Trainer(old, 4, torch.device("cpu")).f0.dropout.p == 0.75
    assert preset("full", "resnet50", 4).train.ce_dropout < 0
