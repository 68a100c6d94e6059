"""DDP: 2 CPU processes (gloo) train through the real Trainer; compare with one process on the same global batch.

What equality is achievable: each DDP rank computes BatchNorm statistics over ITS half of the global batch,
so a DDP run equals a single-process run only where BN does not couple the samples. We therefore check:
  1. all ranks hold bit-identical parameters (DDP averaged the gradients of both passes);
  2. BN frozen (eval-mode statistics; the same ResNet-ADN with its _skip twins otherwise): DDP == the
     single-process Trainer with the same global batch, up to float summation order;
  3. BN in training mode: DDP == a single-process reference that runs each rank's half of every global batch
     separately (per-half BN statistics) and averages the two halves' gradients — the strongest true statement;
     and the plain single-process run on the whole batch differs (so the test can tell the two apart).
"""

import os
import socket
import time
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from adaptive_kernels import create_model
from adaptive_kernels.training import DistEnv, TrainConfig, Trainer, make_synthetic, seed_everything
from adaptive_kernels.training.distributed import init_distributed, shutdown_distributed
from adaptive_kernels.training.step import StepConfig, forward_backward
from adaptive_kernels.training.trainer import build_optimizer, lr_factor

WORLD = 2
GLOBAL_BATCH = 16
CONFIG = {
    "epochs": 2, "batch_size": GLOBAL_BATCH, "lr": 0.05, "warmup_epochs": 0.5, "progress": False,
    "log_every_steps": 1, "eval_batch_size": 16,
}


def freeze_batchnorm(model):
    """Every BatchNorm uses its running statistics and ignores .train(): the model no longer couples samples."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
            m.train = types.MethodType(lambda self, mode=True: self, m)
    return model


def build(frozen_bn):
    data = make_synthetic(num_train=64, num_test=24, num_classes=4, image_size=8, seed=0)
    seed_everything(0)
    model = create_model("resnet20_adn", num_classes=4, in_chans=1, width=2)
    return (freeze_batchnorm(model) if frozen_bn else model), data


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        model, data = build(False)
        try:  # refused on CPU before anything runs (torch's SyncBatchNorm is GPU-only): every rank says why
            Trainer(model, data, TrainConfig(**CONFIG, sync_bn=True), env=env, echo=lambda s: None)
        except ValueError as e:
            (Path(out_dir) / f"sync_bn_rank{rank}.txt").write_text(str(e))
        for name, frozen in (("frozen_bn", True), ("train_bn", False)):
            model, data = build(frozen)
            trainer = Trainer(model, data, TrainConfig(**CONFIG), out_dir=Path(out_dir) / name, env=env,
                              echo=lambda s: None)
            trainer.fit()
            torch.save(dict(model.named_parameters()), Path(out_dir) / f"{name}_rank{rank}.pt")
    finally:
        shutdown_distributed()


def run_ddp(out_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_worker, args=(port, str(out_dir)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError("DDP workers did not finish in 240 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def single_process_trainer(frozen_bn):
    model, data = build(frozen_bn)
    trainer = Trainer(model, data, TrainConfig(**CONFIG), env=DistEnv(), echo=lambda s: None)
    trainer.fit()
    return dict(model.named_parameters())


def per_half_reference():
    """One process reproducing DDP with training-mode BN: each global batch's two rank halves (positions 0::2
    and 1::2, see data.py) run separately, their gradients are averaged, then one optimizer step."""
    model, data = build(False)
    config = TrainConfig(**CONFIG)
    optimizer = build_optimizer(model, config)
    steps = data.steps_per_epoch(GLOBAL_BATCH)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, steps))
    model.train()
    for epoch in range(config.epochs):
        for x, y in data.train_batches(epoch, batch_size=GLOBAL_BATCH, seed=config.seed):
            optimizer.zero_grad()
            for r in range(WORLD):
                forward_backward(model, x[r::WORLD], y[r::WORLD], StepConfig())
            for p in model.parameters():
                if p.grad is not None:
                    p.grad /= WORLD
            optimizer.step()
            scheduler.step()
    return dict(model.named_parameters())


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_ddp(out)
    return out, {
        (name, r): torch.load(out / f"{name}_rank{r}.pt", weights_only=True)
        for name in ("frozen_bn", "train_bn") for r in range(WORLD)
    }


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["frozen_bn", "train_bn"])
def test_ranks_hold_identical_parameters(ddp_results, name):
    _, params = ddp_results
    a, b = params[(name, 0)], params[(name, 1)]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between ranks"


def test_ddp_equals_single_process_with_same_global_batch(ddp_results):
    _, params = ddp_results
    single = single_process_trainer(frozen_bn=True)
    init, _ = build(True)
    moved = max_diff(single, dict(init.named_parameters()))
    assert moved > 1e-3  # training did change the weights
    # Only the order of float additions differs (gradient all-reduce vs one batch); measured 6e-8.
    assert max_diff(params[("frozen_bn", 0)], single) < 1e-6


def test_ddp_with_batchnorm_equals_per_rank_statistics_reference(ddp_results):
    _, params = ddp_results
    ddp = params[("train_bn", 0)]
    assert max_diff(ddp, per_half_reference()) < 1e-6  # measured 1.2e-7
    # BN couples the samples of a batch: training on the whole batch at once gives other weights (measured 0.16).
    assert max_diff(ddp, single_process_trainer(frozen_bn=False)) > 1e-2


def test_only_rank_zero_writes(ddp_results):
    out, _ = ddp_results
    log = (out / "train_bn" / "log.jsonl").read_text().splitlines()
    assert sum('"event": "eval"' in line for line in log) == CONFIG["epochs"]  # one line per epoch, not per rank
    assert sum('"event": "train"' in line for line in log) == CONFIG["epochs"] * 64 // GLOBAL_BATCH
    assert sorted(os.listdir(out / "train_bn")) == ["last.pt", "log.jsonl"]


def test_sync_bn_on_cpu_is_refused_before_training(ddp_results):
    out, _ = ddp_results
    for rank in range(WORLD):
        assert "SyncBatchNorm runs on GPUs only" in (out / f"sync_bn_rank{rank}.txt").read_text()
