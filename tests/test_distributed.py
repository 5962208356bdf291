"""Data-parallel fitting: 2 processes (gloo, CPU) compute what one process does on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bmrs_surgery as bmrs
from bmrs_surgery.data import load_data
from bmrs_surgery.fit import FitConfig, fit
from models import get_model

pytestmark = pytest.mark.slow  # spawned gloo ranks and torchrun

CFG = dict(epochs=3, mode="continuous", prior="uniform", batch_size=50, gate_lr=1.5e-2, finetune_epochs=1)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(rank: int, world: int, out: str, port: int) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    data = load_data("digits", limit=300)  # 240 training examples: 5 global batches, the last of 40
    torch.manual_seed(0)
    gated = bmrs.attach_gates(get_model("lenet5"), data.train.tensors[0][:2])
    result = fit(gated, data, FitConfig(**CFG))
    state = {k: v.clone() for k, v in gated.state_dict().items()}
    if world > 1:  # the decisions must be the same on every rank
        masks = [torch.zeros_like(state["bmrs_gates.mask"]) for _ in range(world)]
        dist.all_gather(masks, state["bmrs_gates.mask"])
        state["all_masks_equal"] = torch.tensor(all(torch.equal(m, masks[0]) for m in masks))
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
    state["kept"] = torch.tensor(result.prune.kept_fraction)
    if rank == 0:
        torch.save(state, out)
    if world > 1:
        # The work is done and saved. Now and then gloo's C++ threads abort in their destructors at
        # interpreter exit ("terminate called without an active exception", SIGABRT), even after the
        # barrier: a spawned rank leaves without running them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def test_two_gloo_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _job(0, 1, str(one), 0)
    mp.spawn(_job, args=(2, str(two), _port()), nprocs=2, join=True)
    a, b = torch.load(one), torch.load(two)
    assert bool(b.pop("all_masks_equal"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_torchrun_cli_writes_outputs_once_from_rank_0(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_port())]
    out = tmp_path / "ddp"
    r = subprocess.run([*torchrun, "-m", "cli.main", "lenet5", "--data", "digits", "--epochs", "1",
                        "--finetune-epochs", "0", "--batch-size", "64", "--bench-batch-sizes", "", "-q", "--json",
                        "--out", str(out)], capture_output=True, text=True, cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count('"schema"') == 1  # one report printed: rank 0 only
    assert sorted(p.name for p in out.iterdir()) == [
        "gated.pt", "pruned.onnx", "pruned.pt", "report.html", "report.json", "scores.csv"]
    assert json.loads((out / "report.json").read_text())["surgery"]["proof"]["ok"]
