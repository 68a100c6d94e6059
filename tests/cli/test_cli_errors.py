"""A user's mistake on the command line: one clear line on stderr, a non-zero exit, no traceback, no work done.

Most cases call ``main`` in this process (an exception escaping ``main`` fails the test: it would be a
traceback); a few representative ones run ``python -m adaptive_kernels`` as real subprocesses, in parallel.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adaptive_kernels.cli import build_parser, checks, main
from adaptive_kernels.training import load_checkpoint, save_checkpoint

TRAIN = ["train", "--model", "resnet20_adn", "--model-arg", "width=2", "--data", "synthetic", "--image-size", "8",
         "--batch-size", "64", "--no-progress", "--epochs", "1", "--train-subset", "128"]
TRAIN_ANY_WIDTH = [a for a in TRAIN if a not in ("--model-arg", "width=2")]  # a test's own --model-arg width=...
EVAL = ["--data", "synthetic", "--image-size", "8", "--latency-repeats", "2"]
ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(TRAIN + ["--out", str(out)]) == 0
    return out


def run_main(argv, capsys) -> tuple[int, str]:
    """``main(argv)``'s exit status (argparse's SystemExit included) and its error, which must be ONE line (on
    stderr, after the phase lines of the work done before it, ``[export] ...``)."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc != 0, f"{argv} succeeded"
    lines = [line for line in err.strip().splitlines() if not line.startswith("[")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return rc, lines[0]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# ---- class 2: numeric flags validated when parsed ------------------------------------------------------------
def test_every_numeric_flag_is_range_checked():
    """No flag of any command takes a bare int/float: each names its allowed range when it rejects a value."""
    for name, sub in subparsers(build_parser()).items():
        for action in sub._actions:
            if action.type in (int, float):
                pytest.fail(f"{name} {action.option_strings[0]} uses a bare {action.type.__name__}")
            if action.type not in (None, checks.device_name, checks.path_text, checks.model_name):  # the text ones
                with pytest.raises(argparse.ArgumentTypeError, match=r"must be .*(>=|>|in [\[(]).*got 'nan'"):
                    action.type("nan")


@pytest.mark.parametrize("argv, flag, allowed", [
    (["eval", "--checkpoint", "x.pt", "--data", "synthetic", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["eval", "--checkpoint", "x.pt", "--data", "synthetic", "--latency-repeats", "0"], "--latency-repeats", "in [1, 10000]"),
    (["eval", "--checkpoint", "x.pt", "--data", "synthetic", "--latency-batch", "-3"], "--latency-batch", ">= 1"),
    (TRAIN + ["--out", "o", "--lr", "nan"], "--lr", "> 0"),
    (TRAIN + ["--out", "o", "--lr", "-0.1"], "--lr", "> 0"),
    (TRAIN + ["--out", "o", "--momentum", "1"], "--momentum", "in [0, 1)"),
    (TRAIN + ["--out", "o", "--ema", "1.5"], "--ema", "in (0, 1)"),
    (TRAIN + ["--out", "o", "--alpha", "inf"], "--alpha", "in [0, 1]"),
    (TRAIN + ["--out", "o", "--workers", "-1"], "--workers", ">= 0"),
    (TRAIN + ["--out", "o", "--top-k", "-2"], "--top-k", ">= 0"),
    (TRAIN + ["--out", "o", "--milestones", "3", "0"], "--milestones", ">= 1"),
    (TRAIN + ["--out", "o", "--seed", "-1"], "--seed", "in [0,"),
    (TRAIN + ["--out", "o", "--time-limit", "0"], "--time-limit", "> 0"),
    (["demo", "--budget-seconds", "0"], "--budget-seconds", "> 0"),
    (["demo", "--width", "two"], "--width", ">= 1"),
    (["eval", "--checkpoint", "x.pt", "--data", "synthetic", "--threads", "100000"], "--threads", "in [1, "),
    (["calibrate", "--checkpoint", "x.pt", "--data", "synthetic", "--out", "c.pt", "--device", "bogus"], "--device",
     "is not a device"),
])
def test_bad_numbers_name_the_flag_and_range(argv, flag, allowed, capsys):
    rc, line = run_main(argv, capsys)
    assert rc == 2 and f"argument {flag}: " in line and allowed in line


def test_zero_means_what_help_says(capsys):
    """--top-k 0 = all classes, --save-every 0 = at epoch ends only; --help says so."""
    train = subparsers(build_parser())["train"]
    args = train.parse_args(["--model", "m", "--data", "synthetic", "--out", "o", "--epochs", "1", "--top-k", "0",
                             "--save-every", "0"])
    assert args.top_k == 0 and args.save_every == 0
    text = " ".join(train.format_help().split())
    assert "(0: all classes)" in text and "(0 or unset: at epoch ends only)" in text


def test_help_shows_each_numeric_flags_range_as_its_error_does_and_each_default_once():
    parsers = subparsers(build_parser())
    serve = " ".join(parsers["serve"].format_help().split())
    assert "the most inputs one engine call takes (int in [1, 1024]) (default: 16)" in serve
    assert "(number in [0, 1)) (default: 0.005)" in serve  # --miss-budget
    calibrate = " ".join(parsers["calibrate"].format_help().split())
    assert "(default 4096) (int >= 1)" in calibrate and "(default: 4096)" not in calibrate  # says it itself
    train = " ".join(parsers["train"].format_help().split())
    assert "--epochs EPOCHS" in train and "(int >= 1)" in train


def test_zero_top_k_trains_on_all_classes(tmp_path, capsys):
    assert main(TRAIN + ["--out", str(tmp_path), "--top-k", "0", "--save-every", "0", "--eval-every", "0"]) == 0
    config = load_checkpoint(tmp_path / "last.pt")["config"]
    assert config["top_k"] is None and config["save_every_steps"] is None


# ---- values that were accepted and then ignored or clamped: refused, before any work ----------------------
@pytest.mark.parametrize("argv, message", [
    (TRAIN + ["--out", "o", "--test-subset", "100000"],
     "--test-subset 100000: synthetic has 256 test images; give at most 256"),
    (TRAIN + ["--out", "o", "--train-subset", "100000"],
     "--train-subset 100000: synthetic has 512 train images; give at most 512"),
    (TRAIN + ["--out", "o", "--skip", "TFT"],
     ("skip='TFT' (--skip) applies only to mode 'single', the one sub-network it trains; mode 'adn' trains every "
     "sub-network: drop --skip, or use --mode single")),
    (TRAIN + ["--out", "o", "--mode", "plain", "--skip", "base"], "mode 'plain' trains the super-net: drop --skip"),
    (TRAIN + ["--out", "o", "--milestones", "1"],
     "(--milestones) apply only to schedule 'multistep'; schedule 'cosine' ignores them"),
    (TRAIN + ["--out", "o", "--data-dir", "."], "--data-dir .: synthetic data is generated, not read"),
    (["demo", "--data", "synthetic", "--out", "o", "--train-subset", "100000"],
     "--train-subset 100000: give from --batch-size (64) to 512 (synthetic's training images)"),
    (["demo", "--data", "synthetic", "--out", "o", "--train-subset", "10"], "--train-subset 10: give from --batch-size"),
])
def test_values_that_would_be_ignored_or_clamped_are_refused(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    rc, line = run_main(argv, capsys)
    assert rc == 2 and message in line
    assert time.perf_counter() - started < 5  # before training, measuring or compiling


@pytest.mark.parametrize("argv, message", [
    (TRAIN + ["--out", "{tmp}/run", "--top-k", "11"], "--top-k 11: synthetic has 10 classes; give at most 10"),
    (TRAIN + ["--out", "{tmp}/run", "--batch-size", "129"],
     "--batch-size 129: synthetic has 128 training images; give at most 128"),
    (["demo", "--data", "synthetic", "--out", "{tmp}/run", "--batch-size", "513"],
     "--batch-size 513: synthetic has 512 training images; give at most 512"),
    (TRAIN + ["--out", "{tmp}/run", "--model-arg", "width=3"], "--model-arg width is given twice: give each key once"),
    (["export", "--model", "resnet20_adn", "--model-arg", "width=2", "--model-arg", "width=2", "--format", "onnx",
      "--out", "{tmp}/m.onnx"], "--model-arg width is given twice"),
    # the smallest input each family takes (tests/models/test_models_input_size.py), before any step or trace
    (TRAIN + ["--out", "{tmp}/run", "--batch-size", "1", "--image-size", "4"],
     "--image-size 4: resnet20_adn needs images of at least 5x5 when it trains on one image per process"),
    (["demo", "--data", "synthetic", "--out", "{tmp}/run", "--batch-size", "1", "--image-size", "4"],
     "give --image-size 5 or more"),
    (["train", "--model", "swin_t_adn", "--data", "synthetic", "--image-size", "3", "--epochs", "1", "--out",
      "{tmp}/run"], "--image-size 3: swin_t_adn needs images of at least 4x4: give --image-size 4 or more"),
    (["export", "--model", "swin_t_adn", "--image-size", "3", "--format", "onnx", "--out", "{tmp}/m.onnx"],
     "--image-size 3: swin_t_adn needs images of at least 4x4"),
    (["train", "--model", "deit_tiny_adn", "--data", "synthetic", "--epochs", "1", "--out", "{tmp}/run"],
     ("--image-size 16: deit_tiny_adn takes 224x224 images only (its position embedding): give --image-size 224, or "
      "build it for these with --model-arg image_size=16")),
    (["export", "--model", "deit_tiny_adn", "--model-arg", "image_size=32", "--image-size", "48", "--format", "onnx",
      "--out", "{tmp}/m.onnx"], "give --image-size 32"),
])
def test_values_the_data_or_the_model_cannot_take_are_refused(argv, message, tmp_path, capsys):
    """Named with the flag and the values allowed, before a step is trained or a graph traced, and the --out folder
    made for the run is removed again."""
    started = time.perf_counter()
    _, line = run_main([a.format(tmp=tmp_path) for a in argv], capsys)
    assert message in line
    assert time.perf_counter() - started < 10
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    # an empty path would be the current folder: a run written into it, --json silently not written
    (TRAIN + ["--out", ""], "argument --out: must be a path, got ''"),
    (["eval", "--checkpoint", "{tmp}/last.pt", "--json", " "], "argument --json: must be a path, got ' '"),
    (["calibrate", "--checkpoint", "", "--out", "{tmp}/c.pt"], "argument --checkpoint: must be a path"),
    (["export", "--model", "resnet20_adn", "--format", "onnx", "--out", ""], "argument --out: must be a path"),
    (["serve", "--checkpoint", "{tmp}/last.pt", "--slo-ms", "5", "--accuracy", ""], "argument --accuracy: must be"),
    (["eval", "--checkpoint", "{tmp}/last.pt", "--data", "fashion-mnist", "--data-dir", ""],
     "argument --data-dir: must be a path"),
    # the name is a segment of /v2/models/NAME/infer: a slash would serve under a URL no client reaches
    (["serve", "--checkpoint", "{tmp}/last.pt", "--slo-ms", "5", "--name", "a/b"],
     "argument --name: must be letters, digits, '_', '.' or '-'"),
    (["export", "--model", "resnet20_adn", "--format", "pt2", "--out", "{tmp}/m.onnx"],
     ("--out {tmp}/m.onnx has the suffix of --format onnx files, but --format pt2 was asked for: give --out "
      "{tmp}/m.pt2 or --format onnx")),
    (["export", "--model", "resnet20_adn", "--format", "onnx", "--out", "{tmp}/m.pt2"], "give --out {tmp}/m.onnx"),
    # the batch of the example input only: a huge one made the export and its check run for minutes
    (["export", "--model", "resnet20_adn", "--format", "onnx", "--batch-size", "100000", "--out", "{tmp}/m.onnx"],
     "argument --batch-size: must be an integer in [1, 256]"),
    (["eval", "--checkpoint", "{tmp}/last.pt", "--latency-repeats", "100000000"],
     "argument --latency-repeats: must be an integer in [1, 10000]"),
    (TRAIN + ["--out", "{tmp}/run", "--warmup-epochs", "1"],
     "warmup_epochs=1 (--warmup-epochs) must be below epochs=1: the learning rate would never reach its peak"),
    (TRAIN + ["--out", "{tmp}/run", "--schedule", "multistep", "--milestones", "1"],
     "milestones=[1] (--milestones): 1 is not below epochs=1, so the run ends before it applies"),
])
def test_values_that_would_do_something_else_than_asked_are_refused(argv, message, tmp_path, capsys):
    started = time.perf_counter()
    _, line = run_main([a.format(tmp=tmp_path) for a in argv], capsys)
    assert message.format(tmp=tmp_path) in line
    assert time.perf_counter() - started < 10
    assert os.listdir(tmp_path) == []


def test_demo_width_error_names_width(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _, line = run_main(["demo", "--data", "synthetic", "--out", "o", "--width", "100000"], capsys)
    assert line.endswith("check --width")  # not --model-arg, which the demo does not have


def test_eval_test_subset_larger_than_the_test_set(trained, capsys):
    _, line = run_main(["eval", "--checkpoint", str(trained / "last.pt"), *EVAL, "--test-subset", "257"], capsys)
    assert "--test-subset 257: synthetic has 256 test images; give at most 256" in line


# ---- class 3: output paths checked before any work -------------------------------------------------------
def _read_only_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write into (as root a chmod is ignored: use a read-only file system)."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if not os.access("/sys", os.W_OK) or _cannot_create_in("/sys"):
        return Path("/sys")
    pytest.skip("running as root without a read-only file system to test against")


def _cannot_create_in(folder: str) -> bool:
    try:
        os.mkdir(os.path.join(folder, "adn_probe"))
    except OSError:
        return True
    os.rmdir(os.path.join(folder, "adn_probe"))
    return False


def test_train_out_under_a_file_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    started = time.perf_counter()
    _, line = run_main(TRAIN + ["--out", str(blocker / "run")], capsys)
    assert f"--out {blocker / 'run'}: {blocker} is a file, not a folder" in line
    assert time.perf_counter() - started < 5  # refused before the data or the model were built


def test_train_and_demo_out_read_only(tmp_path, capsys):
    folder = _read_only_dir(tmp_path) / "run"
    for argv in (TRAIN + ["--out", str(folder)], ["demo", "--data", "synthetic", "--out", str(folder)]):
        _, line = run_main(argv, capsys)
        assert f"--out {folder} is not writable" in line
    assert not folder.exists()


def _output_commands(trained: Path) -> dict[str, list[str]]:
    """Each command that writes a file, with its output flag last."""
    ckpt = str(trained / "last.pt")
    return {"eval": ["eval", "--checkpoint", ckpt, *EVAL, "--json"],
            "calibrate": ["calibrate", "--checkpoint", ckpt, "--data", "synthetic", "--image-size", "8", "--out"],
            "export": ["export", "--checkpoint", ckpt, "--format", "onnx", "--out"]}


@pytest.mark.parametrize("command", ["eval", "calibrate", "export"])
def test_output_files_are_checked_the_same_way_before_any_work(command, trained, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = _output_commands(trained)[command]
    for target, expected in ((blocker / "r.out", f"{blocker} is not a folder"),
                             (tmp_path / "missing" / "r.out", f"the folder {tmp_path / 'missing'} does not exist (create it first)"),
                             (tmp_path, "it is a folder; give a file name"),
                             (_read_only_dir(tmp_path) / "r.out", "the folder is not writable")):
        _, line = run_main(argv + [str(target)], capsys)
        assert f"{argv[-1]} {target}: {expected}" in line
    assert capsys.readouterr().out == ""  # nothing was evaluated, calibrated or exported
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("command", ["eval", "calibrate", "export"])
def test_a_failed_write_keeps_the_previous_file(command, trained, tmp_path, capsys, monkeypatch):
    """A full disk at the end of the work: one error line, the previous file intact, no temporary file left."""
    target = tmp_path / "result"
    target.write_text("previous")
    stale = tmp_path / ".result.k1ll3d.tmp"  # left by a run killed before its rename: the next run removes it
    stale.write_text("")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    _, line = run_main(_output_commands(trained)[command] + [str(target)], capsys)
    assert "No space left on device" in line
    assert target.read_text() == "previous" and os.listdir(tmp_path) == ["result"]


# ---- class 4: no traceback for a user's mistake -------------------------------------------------------------
@pytest.mark.parametrize("extra, expected", [
    (["--model-arg", "bogus=1"], "--model-arg bogus: resnet20_adn takes no such argument (it takes: width)"),
    (["--model-arg", "width=abc"], "width must be a positive int, got 'abc'"),
    (["--model-arg", "num_classes=5"], "--model-arg num_classes=5 but --data synthetic has 10 classes"),
    (["--model-arg", "in_chans=3"], "--model-arg in_chans=3 but --data synthetic has 1 channels"),
    (["--device", "foo"], "argument --device: 'foo' is not a device: use auto, cpu, cuda or cuda:N"),
])
def test_model_and_device_mistakes(extra, expected, tmp_path, capsys):
    _, line = run_main(TRAIN_ANY_WIDTH + ["--out", str(tmp_path / "run")] + extra, capsys)
    assert expected in line
    assert not (tmp_path / "run").exists()  # nothing left behind, not even the folder made to test --out


def test_export_model_arg_mistakes(tmp_path, capsys):
    export = ["export", "--model", "resnet20_adn", "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    _, line = run_main(export + ["--model-arg", "bogus=1"], capsys)
    assert "--model-arg bogus: resnet20_adn takes no such argument (it takes: width)" in line
    _, line = run_main(["export", "--model", "deit_tiny_adn", "--model-arg", "bogus=1", "--format", "onnx",
                        "--out", str(tmp_path / "m.onnx")], capsys)
    assert "--model-arg: deit_tiny_adn rejects" in line


def test_a_diverging_run_is_one_line(tmp_path, capsys):
    _, line = run_main(TRAIN + ["--out", str(tmp_path / "run"), "--lr", "1e30"], capsys)
    assert "loss is nan: lower the learning rate or enable --clip-grad" in line


@pytest.mark.parametrize("argv, expected", [
    (TRAIN + ["--out", "{tmp}/run", "--image-size", "100000"], "synthetic data of 100000x100000 images needs"),
    (TRAIN_ANY_WIDTH + ["--out", "{tmp}/run", "--model-arg", "width=128", "--train-subset", "512", "--batch-size", "512",
                "--image-size", "256"],
     "training resnet20_adn on batches of 512 256x256 images needs at least"),
    (["export", "--model", "resnet20_adn", "--format", "onnx", "--image-size", "100000", "--out", "{tmp}/m.onnx"],
     "exporting resnet20_adn at batch 2 (the check's) and 100000x100000 images needs at least"),
    (["export", "--model", "resnet20_adn", "--model-arg", "width=100000000", "--format", "onnx",
      "--out", "{tmp}/m.onnx"], "resnet20_adn {{'width': 100000000}} needs at least"),
    (["eval", "--checkpoint", "{run}/last.pt", *EVAL, "--latency-batch", "100000000000"],
     "evaluating resnet20_adn on batches of 100000000000 8x8 images needs at least"),
    (["eval", "--checkpoint", "{tmp}/huge.pt", *EVAL], "the model of {tmp}/huge.pt (resnet20_adn"),
    (["demo", "--data", "synthetic", "--width", "100000000", "--out", "{tmp}/demo"], "resnet20_adn {{'num_classes"),
])
def test_requests_beyond_the_machines_memory_are_refused_before_allocating(argv, expected, trained, tmp_path,
                                                                            capsys):
    state = load_checkpoint(trained / "last.pt")
    state["model_spec"]["kwargs"]["width"] = 10**8  # a spec that does not describe the weights, enormous
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, tmp_path / "huge.pt")
    fill = {"tmp": tmp_path, "run": trained}
    _, line = run_main([a.format(**fill) for a in argv], capsys)
    assert expected.format(**fill) in line and "GiB of memory, more than this machine's" in line


def test_model_arg_of_a_kwargs_builder(tmp_path, capsys):
    argv = ["train", "--model", "deit_tiny_adn", "--model-arg", "bogus=1", "--data", "synthetic", "--epochs", "1",
            "--out", str(tmp_path)]
    _, line = run_main(argv, capsys)
    assert "--model-arg: deit_tiny_adn rejects" in line and "bogus" in line


def test_resume_of_a_weights_only_checkpoint(trained, tmp_path, capsys):
    weights = {k: v for k, v in load_checkpoint(trained / "last.pt").items()
               if k in ("model", "model_spec", "data")}
    save_checkpoint(weights, tmp_path / "last.pt")
    _, line = run_main(TRAIN + ["--out", str(tmp_path), "--resume"], capsys)
    assert "cannot resume from" in line and "lacks optimizer, scheduler, epoch" in line


# ---- class 5: checkpoint fields that change results ---------------------------------------------------------
def test_eval_refuses_other_data(trained, capsys):
    ckpt = str(trained / "last.pt")
    _, line = run_main(["eval", "--checkpoint", ckpt, "--data", "synthetic", "--image-size", "12"], capsys)
    assert "trained on data image_size [8, 8] but --image-size gives [12, 12]" in line
    if Path("/usr/share/datasets/fashion-mnist").is_dir():  # 10 classes, 1 channel: only the name differs
        _, line = run_main(["eval", "--checkpoint", ckpt, "--data", "fashion-mnist"], capsys)
        assert "trained on data name 'synthetic' but --data gives 'fashion-mnist'" in line


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_tensors(trained, tmp_path, capsys):
    state = load_checkpoint(trained / "last.pt")
    for weights in ("model", "ema"):
        if state.get(weights) is not None:
            state[weights]["fc.weight"][0, 0] = float("nan")
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, tmp_path / "nan.pt")
    for argv in (["eval", "--checkpoint", str(tmp_path / "nan.pt"), *EVAL],
                 ["export", "--checkpoint", str(tmp_path / "nan.pt"), "--format", "onnx", "--out",
                  str(tmp_path / "m.onnx")]):
        _, line = run_main(argv, capsys)
        assert "1 tensor(s) of its" in line and "hold NaN or infinite values (fc.weight): the run diverged" in line


def test_resume_warns_about_another_world_size(trained, tmp_path, capsys):
    state = load_checkpoint(trained / "last.pt")
    state["world_size"] = 2
    state["rng"] = state["rng"] * 2
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, tmp_path / "last.pt")
    capsys.readouterr()
    assert main(TRAIN + ["--out", str(tmp_path), "--resume", "--epochs", "2", "--train-subset", "64"]) == 2
    assert "data num_train: checkpoint 128 vs now 64" in capsys.readouterr().err
    assert main(TRAIN + ["--out", str(tmp_path), "--resume", "--epochs", "2"]) == 0
    assert "warning: world_size: checkpoint 2 vs now 1" in capsys.readouterr().out


# ---- class 7: a finished run, said clearly ------------------------------------------------------------------
def test_resume_of_a_finished_run_says_so(trained, capsys):
    before = (trained / "last.pt").stat().st_mtime_ns
    assert main(TRAIN + ["--out", str(trained), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train: the run already completed 1 epoch(s) and epochs is 1" in out
    assert (trained / "last.pt").stat().st_mtime_ns == before


# ---- class 9: what the user reads ---------------------------------------------------------------------------
def test_help_is_plain_text_with_defaults():
    parser = build_parser()
    texts = {"": parser.format_help(), **{n: p.format_help() for n, p in subparsers(parser).items()}}
    for name, text in texts.items():
        assert "``" not in text and ":func:" not in text, name
        assert "10-minute" not in text and "10 min" not in text, name
    flat = {n: " ".join(t.split()) for n, t in texts.items()}
    assert "7 minutes" in flat[""] and "7-minute" in flat[""]
    assert "--batch-size BATCH_SIZE GLOBAL batch (split over processes) (int >= 1) (default: 128)" in flat["train"]
    assert ("--warmup-epochs WARMUP_EPOCHS linear LR warmup, may be fractional (0: none) (number >= 0) (default: 0.0)"
            in flat["train"])
    assert ("--latency-repeats LATENCY_REPEATS timed rounds; each round runs every sub-network once "
            "(int in [1, 10000]) (default: 30)") in flat["eval"]
    assert "(default: None)" not in flat["train"] and "(default: False)" not in flat["train"]
    assert "{demo,train,eval,calibrate,export,serve}" in flat[""].split("usage:")[1].split("options:")[0]
    assert "Per-sub-network norm statistics" in flat["calibrate"]
    assert "Write an ONNX file" in flat["export"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    from adaptive_kernels import __version__
    assert capsys.readouterr().out.startswith(f"adaptive-kernels {__version__} (torch {torch.__version__}")


# ---- real subprocesses --------------------------------------------------------------------------------------
def test_cli_errors_in_subprocesses(trained, tmp_path):
    """The same promises seen from a shell: exit status 2, one line on stderr, no traceback, nothing written."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = {
        "batch": (["eval", "--checkpoint", str(trained / "last.pt"), *EVAL, "--batch-size", "0"], "--batch-size"),
        "out": (TRAIN + ["--out", str(blocker / "run")], "is a file, not a folder"),
        "model-arg": (TRAIN + ["--out", str(tmp_path / "a"), "--model-arg", "bogus=1"], "takes no such argument"),
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {k: subprocess.Popen([sys.executable, "-m", "adaptive_kernels", *argv], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
             for k, (argv, _) in cases.items()}
    for key, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (key, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (key, err)
        assert cases[key][1] in err, (key, err)
    assert not (tmp_path / "a" / "last.pt").exists() and not (tmp_path / "a" / "log.jsonl").exists()
