"""Multi-process training on CPU with 2 processes (gloo): the gathered segment pool gives the
same losses and gradients as one process on the whole batch, and torchrun trains a run."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from spml_deploy.config import preset

if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(seed: int = 0):
    """A batch of 4 images whose two halves have equal pixel/label counts (so the mean of the
    per-process means equals the global mean)."""
    g = torch.Generator().manual_seed(seed)
    B, D, h, w, C = 4, 8, 12, 12, 5
    phi = torch.randn(B, D, h, w, generator=g, dtype=torch.float64)
    lab = torch.full((B, h, w), C, dtype=torch.long)           # unlabelled
    lab[:, 2:5, 2:5] = 0
    lab[0, 7:10, 7:10] = 1
    lab[1, 7:10, 7:10] = 2
    lab[2, 7:10, 7:10] = 1
    lab[3, 7:10, 7:10] = 3
    reg = (torch.arange(h).view(1, h, 1) // 4 * 3 + torch.arange(w).view(1, 1, w) // 4).expand(B, h, w)
    tags = torch.zeros(B, C, dtype=torch.float64)
    for b, c in enumerate((1, 2, 1, 3)):
        tags[b, c] = 1
    return phi, lab, reg.contiguous(), tags, C


def _losses(phi, lab, reg, tags, C):
    from spml_deploy.training.spml_loss import spml_losses

    cfg = preset("scribbles", "tiny", C)
    return spml_losses(phi, lab, reg, tags, cfg.loss, cfg.segmentation, cfg.compat, None, C)


def _worker(rank: int, world: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        phi, lab, reg, tags, C = _batch()
        sl = slice(rank * 2, rank * 2 + 2)
        mine = phi[sl].clone().requires_grad_(True)
        res = _losses(mine, lab[sl], reg[sl], tags[sl], C)
        (res["loss"] / world).backward()        # DDP averages over processes
        q.put((rank, {k: float(res[k].detach()) for k in ("L_I", "L_A", "L_C")},
               float(res["loss"].detach()), mine.grad.numpy().copy(), int(res["num_segments"])))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_match_one_process():
    phi, lab, reg, tags, C = _batch()
    full = phi.clone().requires_grad_(True)
    ref = _losses(full, lab, reg, tags, C)
    ref["loss"].backward()

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict((r, rest) for r, *rest in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    terms = [out[r][0] for r in (0, 1)]
    for k in ("L_I", "L_A", "L_C"):
        assert (terms[0][k] + terms[1][k]) / 2 == pytest.approx(float(ref[k].detach()), rel=1e-9), k
    # every pixel's gradient, including the parts that flow through the other process's
    # prototypes, equals the single-process gradient
    grad = torch.cat([torch.from_numpy(out[0][2]), torch.from_numpy(out[1][2])])
    torch.testing.assert_close(grad, full.grad, rtol=1e-7, atol=1e-10)
    # each process formed the segments of its own images; together they are the batch's
    assert out[0][3] + out[1][3] == int(ref["num_segments"])


@pytest.mark.slow
def test_torchrun_trains_with_two_processes(tmp_path):
    from spml_deploy.data.synth import synthesize

    ds = tmp_path / "ds"
    synthesize(ds, n_train=4, n_val=1, size=64, seed=1)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun) if torchrun.exists() else sys.executable, "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "spml_deploy.cli", "train", str(ds),
           "--supervision", "points", "--out", str(tmp_path / "run"), "--iters", "2",
           "--batch", "2", "--crop", "64", "--quiet", "--set", "train.classifier_iters=1"]
    if not torchrun.exists():
        cmd[1:1] = ["-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2
    assert (tmp_path / "run" / "spml.json").is_file()


@pytest.mark.slow
def test_torchrun_trains_across_two_nodes(tmp_path):
    """README's several-machines command, with two launchers on this machine as the two nodes
    (static rendezvous on loopback): node 0 writes the run, both finish the same steps."""
    from spml_deploy.data.synth import synthesize

    ds = tmp_path / "ds"
    synthesize(ds, n_train=4, n_val=1, size=64, seed=1)
    port = _free_port()
    base = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(port)]
    train = ["-m", "spml_deploy.cli", "train", str(ds), "--supervision", "points",
             "--out", str(tmp_path / "run"), "--iters", "2", "--batch", "2", "--crop", "64",
             "--quiet", "--set", "train.classifier_iters=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(base + ["--node_rank", str(r)] + train, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    for p, out in zip(nodes, outputs):
        assert p.returncode == 0, out[-3000:]
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2
    assert (tmp_path / "run" / "spml.json").is_file()
