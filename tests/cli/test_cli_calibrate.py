"""``python -m adaptive_kernels calibrate``: the written checkpoint holds the tables that ``calibrate`` computes
on the first N un-augmented training images, keeps everything else, loads in ``eval``; errors name the problem."""

import pytest
import torch
from helpers import randomize

from adaptive_kernels import calibrate, create_model
from adaptive_kernels.cli import main
from adaptive_kernels.training import build_data, load_checkpoint, save_checkpoint
from adaptive_kernels.training.checkpoint import INT8_SAMPLE
from adaptive_kernels.training.data import calibration_batches

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = ["--data", "synthetic", "--image-size", "8"]
SPEC = {"name": "resnet20_adn", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 2}}


def test_calibrate_command_writes_calibrated_checkpoint(tmp_path, capsys):
    model = randomize(create_model(SPEC["name"], **SPEC["kwargs"]), seed=0, calibrate=(8, 1, 8, 8))
    src, out = tmp_path / "last.pt", tmp_path / "calibrated.pt"
    save_checkpoint({"model": model.state_dict(), "model_spec": SPEC, "epoch": 3}, src)
    before = src.read_bytes()
    assert main(["calibrate", "--checkpoint", str(src), *DATA, "--images", "96", "--batch-size", "32",
                 "--int8-images", "40", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "96/96 images x 8 sub-networks" in printed and f"wrote {out}" in printed
    assert src.read_bytes() == before  # the source checkpoint is untouched
    state = load_checkpoint(out)
    assert state["epoch"] == 3 and state["calibration"]["images"] == 96
    # Reference: calibrate() in this process on the first 96 training images of epoch 0's order, un-augmented.
    data = build_data("synthetic", image_size=8, augment=False)
    images = torch.cat([x for x, _ in data.train_batches(0, batch_size=32, seed=0)])[:96]
    calibrate(model, images, batch_size=32)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(state["model"][k], v, rtol=0, atol=0, msg=k)
    # the INT8 sample is the first 40 of those same images (the one data pass), in float16
    torch.testing.assert_close(state[INT8_SAMPLE], images[:40].half(), rtol=0, atol=0)
    assert main(["eval", "--checkpoint", str(out), *DATA, "--latency-repeats", "1"]) == 0
    assert "model weights, calibrated)" in capsys.readouterr().out
    pytest.importorskip("onnxruntime", reason="pip install adaptive_kernels[onnx]")
    # export of the calibrated checkpoint: one graph, every calibrated sub-network verified by ONNX Runtime
    assert main(["export", "--checkpoint", str(out), "--format", "onnx", "--out", str(tmp_path / "c.onnx")]) == 0
    assert "ok: 8 sub-network(s) within 0.0001" in capsys.readouterr().out


def test_calibration_batches_keep_a_last_partial_batch():
    # 37 images in batches of 16: 16 + 16 + 5, the first 37 of epoch 0's order; a single leftover is not used.
    data = build_data("synthetic", image_size=8, augment=False, train_subset=37)
    order = torch.cat([x for x, _ in data.train_batches(0, batch_size=37, seed=0)])
    got = list(calibration_batches(data, 4096, 16))
    assert [len(b) for b in got] == [16, 16, 5]
    torch.testing.assert_close(torch.cat(got), order, rtol=0, atol=0)
    assert [len(b) for b in calibration_batches(data.subset(num_train=33), 4096, 16)] == [16, 16]
    assert [len(b) for b in calibration_batches(data, 20, 16)] == [16, 4]


def test_calibrate_command_errors(tmp_path, capsys):
    model = create_model(SPEC["name"], **SPEC["kwargs"])
    src = tmp_path / "last.pt"
    save_checkpoint({"model": model.state_dict(), "model_spec": SPEC}, src)
    for extra, message in (
        (["--images", "1"], "num_images must be an int >= 2"),
        (["--weights", "ema"], "holds no EMA weights"),
    ):
        assert main(["calibrate", "--checkpoint", str(src), *DATA, "--out", str(tmp_path / "c.pt"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", str(src), *DATA, "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "c.pt").exists()


def test_calibrate_and_eval_default_to_the_checkpoints_dataset(tmp_path, capsys):
    model = create_model(SPEC["name"], **SPEC["kwargs"])
    src, out = tmp_path / "last.pt", tmp_path / "calibrated.pt"
    save_checkpoint({"model": model.state_dict(), "model_spec": SPEC,
                     "data": {"name": "synthetic", "image_size": [8, 8]}}, src)
    assert main(["calibrate", "--checkpoint", str(src), "--images", "32", "--out", str(out)]) == 0
    assert "32 un-augmented synthetic training images, batches" in capsys.readouterr().out
    # more images than the training set holds: all of them, and the line says so
    assert main(["calibrate", "--checkpoint", str(src), "--images", "100000", "--out", str(out)]) == 0
    assert ("512 un-augmented synthetic training images (all of them: synthetic has fewer than 100000)"
            in capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(out), "--latency-repeats", "1"]) == 0
    assert "synthetic test set" in capsys.readouterr().out
    save_checkpoint({"model": model.state_dict(), "model_spec": SPEC}, src)
    assert main(["calibrate", "--checkpoint", str(src), "--out", str(out)]) == 2
    assert f"{src} does not record its dataset: give --data" in capsys.readouterr().err
