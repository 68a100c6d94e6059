"""What a run leaves behind and what it tells: stale temp files, file modes, the log after a resume, progress
lines off a terminal, interleaved latency rounds, ImageFolder batches that do not depend on workers/resume."""

import io
import json
import logging
import os
import time

import pytest
import torch

from adaptive_kernels import create_model, select_skip
from adaptive_kernels.cli.demo import budget_choices
from adaptive_kernels.training import TrainConfig, Trainer, make_synthetic, measure_latencies_us, seed_everything
from adaptive_kernels.training.checkpoint import save_checkpoint
from adaptive_kernels.training.evaluate import SubnetResult
from adaptive_kernels.training.trainer import PlainProgress

CONFIG = {"epochs": 1, "batch_size": 16, "lr": 0.05, "progress": False, "log_every_steps": 1, "eval_every_epochs": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(out_dir, **config):
    data = make_synthetic(num_train=64, num_test=16, num_classes=4, image_size=8)
    seed_everything(0)
    model = create_model("resnet20_adn", num_classes=4, in_chans=1, width=2)
    return Trainer(model, data, TrainConfig(**{**CONFIG, **config}), out_dir=out_dir, echo=lambda s: None)


def test_stale_temp_files_are_removed_at_start(tmp_path):
    stale = tmp_path / ".last.pt.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 1000)
    other = tmp_path / ".other.pt.abc.tmp"  # not ours: left alone
    other.write_bytes(b"x")
    make_trainer(tmp_path)
    assert not stale.exists() and other.exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = save_checkpoint({"model": {"w": torch.zeros(1)}}, tmp_path / "last.pt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_log_has_no_repeated_records_after_a_resume(tmp_path):
    full = make_trainer(tmp_path / "full")
    full.fit()
    steps = full.steps_per_epoch
    interrupted = make_trainer(tmp_path / "cut", save_every_steps=2, stop_at_step=2)
    interrupted.fit()
    log = tmp_path / "cut" / "log.jsonl"
    # A kill after the checkpoint at step 2: two more steps were logged, and a line was half written.
    with open(log, "a") as f:
        f.writelines(json.dumps({"event": "train", "global_step": s, "step": s, "epoch": 1}) + "\n" for s in (3, 4))
        f.write('{"event": "tra')
    resumed = make_trainer(tmp_path / "cut", save_every_steps=2)
    resumed.resume()
    resumed.fit()

    def train_steps(path):
        return [r["global_step"] for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "train"]

    assert train_steps(log) == list(range(1, steps + 1)) == train_steps(tmp_path / "full" / "log.jsonl")
    assert [json.loads(line)["event"] for line in log.read_text().splitlines()].count("resume") == 1


def test_progress_off_a_terminal_is_a_few_whole_lines():
    out = io.StringIO()
    bar = PlainProgress(total=40, initial=0, desc="epoch 1/2", file=out)
    for _ in range(40):
        bar.update(1)
        bar.set_postfix({"loss": "1.23"})
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 10
    assert lines[-1].startswith("epoch 1/2: step 40/40, ") and lines[-1].endswith(", loss 1.23")


def test_trainer_prints_plain_progress_when_stderr_is_not_a_tty(tmp_path, capsys):
    make_trainer(tmp_path, progress=True).fit()
    err = capsys.readouterr().err  # captured: not a terminal
    assert "\r" not in err and "epoch 1/1: step 4/4" in err


class CallOrder(torch.nn.Module):
    """Records which sub-network each forward runs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, skip=None):
        self.calls.append(skip)
        return x


def test_latency_rounds_interleave_every_subnetwork():
    model = CallOrder()
    skips = ["FF", "FT", "TF", "TT"]
    stats = measure_latencies_us(model, skips, (1, 1, 2, 2), warmup=1, rounds=3)
    rounds = [model.calls[i:i + 4] for i in range(0, len(model.calls), 4)]
    assert len(rounds) == 4 and all(sorted(r) == skips for r in rounds)  # each round runs each sub-network once
    assert [r[0] for r in rounds] == ["FF", "FT", "TF", "TT"]  # starting one later each round
    assert all(s.p20_us <= s.median_us <= s.p80_us for s in stats)


def test_a_long_latency_measurement_says_how_far_it_is_and_how_long_is_left(monkeypatch, caplog):
    from adaptive_kernels.training import evaluate

    class Slow(CallOrder):
        def forward(self, x, skip=None):
            time.sleep(0.01)
            return super().forward(x, skip)

    monkeypatch.setattr(evaluate, "PROGRESS_EVERY_S", 0.05)
    with caplog.at_level(logging.INFO, logger="adaptive_kernels"):
        measure_latencies_us(Slow(), ["FF", "TT"], (1, 1, 2, 2), warmup=1, rounds=9)  # ~0.2 s in 10 rounds
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[latency]")]
    assert 1 <= len(lines) <= 5, lines  # one line per PROGRESS_EVERY_S, none after the last round
    done, total = (int(n) for n in lines[-1].split()[1].split("/"))
    assert total == 10 and done < total and lines[-1].endswith("s left")


def result(skip, accuracy, median, p20, p80):
    return SubnetResult(skip, accuracy, 0, median, p20, p80)


def test_budget_choices_flag_picks_the_spread_could_change():
    steady = [result("FF", 90.0, 100.0, 99.0, 101.0), result("TT", 80.0, 50.0, 49.0, 51.0)]
    assert all(c["reliable"] for c in budget_choices(steady))
    # FF's latency varies from 60 to 140 us: at TT's budget (50 us) it cannot fit, at the midpoint (75 us) it might.
    noisy = [result("FF", 90.0, 100.0, 60.0, 140.0), result("TT", 80.0, 50.0, 49.0, 51.0)]
    by_budget = {c["budget_us"]: c for c in budget_choices(noisy)}
    assert by_budget[75.0]["skip"] == "TT" and not by_budget[75.0]["reliable"] and by_budget[75.0]["doubts"] == ["FF"]
    assert by_budget[100.0]["skip"] == "FF" and by_budget[100.0]["reliable"]  # the most accurate one: no doubt
    assert by_budget[50.0]["reliable"]  # FF's p20 (60 us) is over 50 us


def test_select_skip_takes_numpy_scalars_and_names_lengths():
    np = pytest.importorskip("numpy")
    latency = {"FF": np.float32(100.0), "TT": np.float64(50.0), "FT": np.int64(70)}
    accuracy = {"FF": np.float32(90.0), "TT": 80.0, "FT": np.float64(85.0)}
    assert select_skip(latency, accuracy, np.int64(80)) == (False, True)
    with pytest.raises(ValueError, match="latency_table has skip configurations of 3 flags but accuracy_table of 2"):
        select_skip({"FFF": 1.0, "TTT": 0.5}, accuracy, 10.0)
    with pytest.raises(ValueError, match="budget_us must be a positive number"):
        select_skip(latency, accuracy, np.bool_(True))


def test_sync_bn_is_a_no_op_in_one_process(tmp_path):
    said = []
    data = make_synthetic(num_train=32, num_test=8, num_classes=4, image_size=8)
    model = create_model("resnet20_adn", num_classes=4, in_chans=1, width=2)
    trainer = Trainer(model, data, TrainConfig(**{**CONFIG, "sync_bn": True}), echo=said.append)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.modules())
    assert any("sync_bn has no effect in one process" in s for s in said)


# ---- ImageFolder: batches independent of workers and of where a resumed epoch starts --------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    pytest.importorskip("torchvision")
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (20, 20, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def test_imagefolder_batches_do_not_depend_on_workers_or_resume(image_folder):
    from adaptive_kernels.training import ImageFolderData

    def batches(workers, start_step=0, epoch=0):
        data = ImageFolderData(image_folder, image_size=8, num_workers=workers, augment=True)
        return list(data.train_batches(epoch, batch_size=4, seed=3, start_step=start_step))

    reference = batches(0)
    rng_before = torch.get_rng_state()
    assert len(reference) == 3
    for got in (batches(2), [None] + batches(0, start_step=1)):
        for want, have in zip(reference, got):
            if have is not None:
                assert torch.equal(want[0], have[0]) and torch.equal(want[1], have[1])
    assert torch.equal(torch.get_rng_state(), rng_before)  # augmenting did not move the training RNG
    other_epoch = batches(0, epoch=1)
    assert not torch.equal(reference[0][0], other_epoch[0][0])  # a new epoch draws new augmentations
