"""CLI smoke tests on synthetic data: train / resume / eval / demo, and their error messages."""

import json
import re
import shlex
import subprocess
import sys

import pytest
import torch

from adaptive_kernels import create_model
from adaptive_kernels.cli import main
from adaptive_kernels.training import accuracy, load_checkpoint, make_synthetic

TRAIN = ["train", "--model", "resnet20_adn", "--model-arg", "width=2", "--data", "synthetic", "--image-size", "8",
         "--batch-size", "64", "--no-progress", "--log-every", "1"]
EVAL = ["--data", "synthetic", "--image-size", "8", "--latency-repeats", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(TRAIN + ["--epochs", "1", "--out", str(out)]) == 0
    return out


def test_train_writes_checkpoint_and_log(trained):
    state = load_checkpoint(trained / "last.pt")
    assert state["epoch"] == 1 and state["global_step"] == 512 // 64
    assert state["model_spec"] == {"name": "resnet20_adn", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 2}}
    events = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("train") == 8
    assert {"loss_super", "loss_kd", "lr", "img_per_s"} <= events[0].keys()
    assert any(e["event"] == "eval" and "acc_base" in e for e in events)


def test_train_refuses_to_clobber_and_resumes(trained, tmp_path, capsys):
    assert main(TRAIN + ["--epochs", "1", "--out", str(trained)]) == 2
    assert "exists: pass --resume" in capsys.readouterr().err
    assert main(TRAIN + ["--epochs", "1", "--out", str(tmp_path), "--resume"]) == 2
    assert "there is no checkpoint" in capsys.readouterr().err
    # Resuming into a copy with a longer run continues from step 8.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "last.pt").write_bytes((trained / "last.pt").read_bytes())
    assert main(TRAIN + ["--epochs", "2", "--out", str(copy), "--resume"]) == 0
    assert load_checkpoint(copy / "last.pt")["global_step"] == 16
    assert main(TRAIN + ["--epochs", "2", "--lr", "0.3", "--out", str(copy), "--resume"]) == 2
    assert "different settings (lr: checkpoint 0.1 vs now 0.3)" in capsys.readouterr().err


def test_eval_reports_every_subnetwork(trained, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(trained / "last.pt"), *EVAL, "--json", str(out)]) == 0
    captured = capsys.readouterr()
    table = captured.out
    # the CPU engine's build, phase by phase on stderr (minutes for a large model)
    phases = [line.split(" (")[0].split(" ...")[0] for line in captured.err.splitlines()]
    assert phases[:2] == [("[compile] ResNetADN on the CPU: exporting every sub-network to one ONNX graph for ONNX "
                          "Runtime"), "[export] tracing ResNetADN"], captured.err
    assert "[compile] laying the graph out for this CPU and loading it in ONNX Runtime" in phases
    assert any(p.startswith("[compile] ResNetADN ready on ONNX Runtime in ") for p in phases)
    assert "[eval] timing 8 sub-networks: 2 rounds at batch 64" in phases
    assert captured.err.splitlines()[-1] == "[eval] scoring TTT (8/8) on 256 test images ..."
    rows = json.loads(out.read_text())
    assert len(rows) == 8 and all(
        r.keys() == {"skip", "accuracy", "macs", "latency_us", "latency_p20_us", "latency_p80_us"} for r in rows)
    assert all(r["skip"] in table for r in rows)
    # Independent check: rebuild the model from the checkpoint and score it directly.
    model = create_model("resnet20_adn", num_classes=10, in_chans=1, width=2)
    model.load_state_dict(load_checkpoint(trained / "last.pt")["model"])
    data = make_synthetic(image_size=8)
    by_skip = {r["skip"]: r for r in rows}
    for skip in ("FFF", "TFT", "TTT"):
        assert by_skip[skip]["accuracy"] == pytest.approx(accuracy(model, data, skip))
        assert by_skip[skip]["macs"] == model.macs(skip, (8, 8))
        assert 0 < by_skip[skip]["latency_p20_us"] <= by_skip[skip]["latency_us"] <= by_skip[skip]["latency_p80_us"]
    assert by_skip["TTT"]["macs"] < by_skip["TFT"]["macs"] < by_skip["FFF"]["macs"]


def test_eval_errors_name_the_problem(tmp_path, trained, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(bad), *EVAL]) == 2
    assert "bad.pt cannot be read" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(trained / "last.pt"), *EVAL, "--weights", "ema"]) == 2
    assert "holds no EMA weights" in capsys.readouterr().err


def test_single_mode_needs_a_skip(tmp_path, capsys):
    assert main(TRAIN + ["--epochs", "1", "--out", str(tmp_path), "--mode", "single"]) == 2
    assert "--skip CFG" in capsys.readouterr().err
    assert main(TRAIN + ["--epochs", "1", "--out", str(tmp_path), "--mode", "single", "--skip", "TFX"]) == 2
    assert "unknown letter" in capsys.readouterr().err


def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--data", "synthetic", "--budget-seconds", "8", "--width", "2", "--out", str(out),
                 "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "subnets.json").read_text())
    assert len(rows) == 8 and {r["skip"] for r in rows} == {f"{a}{b}{c}" for a in "TF" for b in "TF" for c in "TF"}
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_seconds"] < 60
    assert load_checkpoint(out / "last.pt")["model_spec"]["kwargs"]["width"] == 2
    calibrated = create_model("resnet20_adn", num_classes=10, in_chans=1, width=2)
    calibrated.load_state_dict(load_checkpoint(out / "calibrated.pt")["model"])
    assert calibrated.is_calibrated and summary["calibration"]["images"] == summary["plan"]["train_images"]
    # serve --int8's hint (calibrate again, keeping images) names the flags that give the same norms: the demo's
    # calibrated.pt records its calibration as `calibrate` does (without them: other norms than were evaluated)
    from adaptive_kernels.serving.plan import int8_sample

    with pytest.raises(ValueError, match="keeps no images") as refused:
        int8_sample(out / "calibrated.pt")
    command = re.search(r"`python -m adaptive_kernels (calibrate [^`]*)`", str(refused.value)).group(1)
    assert f"--images {summary['calibration']['images']} --batch-size " in command
    assert main(shlex.split(command.replace("CALIBRATED.pt", str(tmp_path / "again.pt")))) == 0
    again, first = (load_checkpoint(p)["model"] for p in (tmp_path / "again.pt", out / "calibrated.pt"))
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert int8_sample(tmp_path / "again.pt").shape[1:] == (1, 16, 16)
    assert "as trained %" in printed and all("accuracy_as_trained" in r for r in rows)
    for name in ("last.pt", "subnets.json", "tradeoff.png"):
        assert str(out / name) in printed  # the demo says where its outputs went
    assert "TTT" in printed and "calibrated %" in printed  # the table
    # the closing hint runs with this interpreter (a venv's python, not whatever "python" is on the PATH)
    assert f"{shlex.quote(sys.executable)} -m adaptive_kernels eval --checkpoint" in printed
    assert "(1 thread)" in printed and "1 threads" not in printed
    # a sub-network picked for three latency budgets: the most accurate one that fits each
    selections = summary["selections"]
    assert len(selections) == 3 and printed.count("select_skip picks") == 3
    assert selections[0]["budget_us"] == min(r["latency_us"] for r in rows)
    assert selections[-1]["budget_us"] == max(r["latency_us"] for r in rows)
    for choice in selections:
        fitting = [r for r in rows if r["latency_us"] <= choice["budget_us"]]
        assert choice["latency_us"] <= choice["budget_us"]
        assert choice["accuracy"] == max(r["accuracy"] for r in fitting)


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "adaptive_kernels", "--help"], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout and "train" in done.stdout and "eval" in done.stdout
