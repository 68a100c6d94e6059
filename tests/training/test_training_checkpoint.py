"""Checkpoints: atomic writes that survive a kill, clear errors for bad files, and exact resume."""

import datetime
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from adaptive_kernels import create_model
from adaptive_kernels.training import TrainConfig, Trainer, make_synthetic, seed_everything
from adaptive_kernels.training import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


pytestmark = pytest.mark.usefixtures("one_thread")


def small_state(tag, n=3):
    return {"model": {"w": torch.full((n,), float(tag))}, "tag": tag}


# ---- atomic writes ----------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    path = ckpt.save_checkpoint(small_state(1), tmp_path / "sub" / "last.pt")
    state = ckpt.load_checkpoint(path)
    assert state["tag"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path / "sub")) == ["last.pt"]  # no temp file left behind


def test_failure_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(small_state(1), path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(small_state(2), path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["tag"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # the partial temp file was removed


@pytest.mark.parametrize("where", ["while writing", "before the rename"])
def test_process_killed_while_saving_leaves_previous_checkpoint_loadable(tmp_path, where):
    path = tmp_path / "last.pt"
    # The child saves once, then starts a second save that stalls at `where`; the parent SIGKILLs it there.
    stall = {
        "while writing": "torch.save = lambda obj, f, *a, **k: (f.write(b'PK\\x03\\x04partial'), f.flush(), stall())",
        "before the rename": "os.replace = lambda *a, **k: stall()",
    }[where]
    script = textwrap.dedent(f"""
        import os, sys, time, torch
        sys.path.insert(0, {ROOT!r})
        from adaptive_kernels.training.checkpoint import save_checkpoint
        save_checkpoint({{"model": {{"w": torch.zeros(3)}}, "tag": 1}}, {str(path)!r})
        def stall():
            print("STALLED", flush=True)
            time.sleep(60)
        {stall}
        save_checkpoint({{"model": {{"w": torch.ones(100_000)}}, "tag": 2}}, {str(path)!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "STALLED"
        temps = [f for f in os.listdir(tmp_path) if f != "last.pt"]
        assert temps, "the second save should be in progress in a temp file"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    state = ckpt.load_checkpoint(path)
    assert state["tag"] == 1 and torch.equal(state["model"]["w"], torch.zeros(3))


# ---- clear errors -----------------------------------------------------------------------------------------
def test_truncated_file_gives_clear_error(tmp_path):
    path = ckpt.save_checkpoint(small_state(1, n=10_000), tmp_path / "last.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"last\.pt cannot be read.*truncated"):
        ckpt.load_checkpoint(path)


def test_garbage_missing_and_foreign_files_give_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(ckpt.CheckpointError, match="garbage.pt cannot be read"):
        ckpt.load_checkpoint(garbage)
    pickled = tmp_path / "pickled.pt"  # a pickle of an arbitrary object: never unpickled, nor advised to be
    pickled.write_bytes(pickle.dumps(datetime.date(2026, 1, 1), protocol=2))
    with pytest.raises(ckpt.CheckpointError, match="pickled.pt cannot be read.*never unpickled here") as error:
        ckpt.load_checkpoint(pickled)
    assert "weights_only" not in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ckpt.CheckpointError, match="nothere.pt does not exist"):
        ckpt.load_checkpoint(tmp_path / "nothere.pt")
    bare = tmp_path / "bare.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bare)
    with pytest.raises(ckpt.CheckpointError, match="bare.pt is not an adaptive_kernels training checkpoint"):
        ckpt.load_checkpoint(bare)


def test_pickled_code_is_refused(tmp_path):
    # weights_only loading: a checkpoint that would run code on load is rejected, not executed.
    evil = tmp_path / "evil.pt"
    torch.save({"format": "adaptive_kernels.checkpoint", "version": 1, "model": {}, "x": random.Random(0)}, evil)
    with pytest.raises(ckpt.CheckpointError, match="evil.pt cannot be read"):
        ckpt.load_checkpoint(evil)


def test_state_dict_of_another_architecture_is_named(tmp_path):
    small = create_model("resnet20_adn", num_classes=10, in_chans=1, width=2)
    big = create_model("resnet20_adn", num_classes=10, in_chans=1, width=4)
    with pytest.raises(ckpt.CheckpointError, match=r"run7\.pt does not fit ResNetADN.*shape mismatches \['conv1.weight"):
        ckpt.load_model_state(small, big.state_dict(), "run7.pt")


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save_checkpoint({"model": {}, "rng": ckpt.capture_rng_state()}, tmp_path / "r.pt")
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


# ---- exact resume -----------------------------------------------------------------------------------------
def make_trainer(out_dir, seed_for_init=0, **overrides):
    data = make_synthetic(num_train=96, num_test=32, num_classes=4, image_size=8, seed=0)
    seed_everything(seed_for_init)
    model = create_model("resnet20_adn", num_classes=4, in_chans=1, width=2)
    cfg = {
        "epochs": 2, "batch_size": 16, "lr": 0.05, "warmup_epochs": 0.5, "ema_decay": 0.9, "mixup_alpha": 0.2,
        "label_smoothing": 0.1, "progress": False, "log_every_steps": 1, "eval_batch_size": 32,
    }
    cfg.update(overrides)
    spec = {"name": "resnet20_adn", "kwargs": {"num_classes": 4, "in_chans": 1, "width": 2}}
    return Trainer(model, data, TrainConfig(**cfg), out_dir=out_dir, model_spec=spec, echo=lambda s: None)


def full_state(trainer):
    out = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
    for i, s in trainer.optimizer.state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in s.items() if torch.is_tensor(v)})
    return out


@pytest.mark.parametrize("optimizer,stop_at", [("sgd", 8), ("adamw", 6)])
def test_resumed_run_equals_uninterrupted_run(tmp_path, optimizer, stop_at):
    """Stop after `stop_at` steps (mid-epoch for 8: 6 steps per epoch; at an epoch end for 6), resume in a
    fresh Trainer whose model was initialised differently, and finish: everything equals an uninterrupted run."""
    whole = make_trainer(tmp_path / "whole", optimizer=optimizer)
    whole.fit()

    first = make_trainer(tmp_path / "split", optimizer=optimizer, stop_at_step=stop_at)
    summary = first.fit()
    assert summary["stopped_early"] and summary["global_step"] == stop_at
    second = make_trainer(tmp_path / "split", seed_for_init=123, optimizer=optimizer)
    second.resume()
    assert second.global_step == stop_at
    summary = second.fit()
    assert summary["global_step"] == whole.global_step == 12

    a, b = full_state(whole), full_state(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert second.scheduler.state_dict() == whole.scheduler.state_dict()
    assert second.history == whole.history  # same test accuracies after each epoch
    # And the checkpoint on disk holds the final state.
    on_disk = ckpt.load_checkpoint(tmp_path / "split" / "last.pt")
    assert on_disk["epoch"] == 2 and on_disk["global_step"] == 12
    for k, v in on_disk["model"].items():
        assert torch.equal(v, whole.model.state_dict()[k])


def test_resume_with_other_settings_is_refused(tmp_path):
    first = make_trainer(tmp_path, stop_at_step=2)
    first.fit()
    other = make_trainer(tmp_path, lr=0.2)
    with pytest.raises(ckpt.CheckpointError, match=r"different settings \(lr: checkpoint 0.05 vs now 0.2\)"):
        other.resume()
    longer = make_trainer(tmp_path, epochs=3)  # the run length may change
    longer.resume()
    assert longer.global_step == 2


def _corrupt(state, change):
    change(state)
    return state


@pytest.mark.parametrize("change, message", [
    (lambda s: s.__setitem__("model_spec", "resnet"), "its model_spec 'resnet' is not {'name': str, 'kwargs': dict}"),
    (lambda s: s.__setitem__("model_spec", {"name": "nosuch", "kwargs": {}}),
     "holds a model this adaptive_kernels does not have: unknown model 'nosuch'"),
    (lambda s: s["model_spec"]["kwargs"].__setitem__("bogus", 1),
     "does not build: resnet20_adn() got an unexpected keyword argument 'bogus'"),
    (lambda s: s.__setitem__("model", [1, 2]), "its model weights are not a state dict of tensors (a list)"),
    (lambda s: s.__setitem__("data", {"name": "synthetic", "image_size": "x"}), "its data record"),
    # an integer tensor where the model has a float parameter: load_state_dict would cast it (0.03 -> 0)
    (lambda s: s["model"].__setitem__("conv1.weight", s["model"]["conv1.weight"].long()),
     "shape mismatches ['conv1.weight: torch.int64 in file vs torch.float32']"),
])
def test_a_checkpoint_with_a_corrupt_record_is_named_not_a_traceback(tmp_path, change, message):
    model = create_model("resnet20_adn", num_classes=10, in_chans=1, width=2)
    state = {"model": model.state_dict(), "model_spec": {"name": "resnet20_adn",
             "kwargs": {"num_classes": 10, "in_chans": 1, "width": 2}}, "data": {"name": "synthetic",
             "image_size": [8, 8]}}
    path = ckpt.save_checkpoint(_corrupt(state, change), tmp_path / "bad.pt")
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.model_from_checkpoint(path)
    assert message in str(error.value) and str(path) in str(error.value)
