"""``cli/checks.py`` beyond the argument checks (tests/cli/test_cli_errors.py): ``--threads auto`` (parsing, which
commands take it, the measurement choosing a count) and the phase lines a command shows."""

import argparse
import logging

import pytest
import torch

from adaptive_kernels import create_model
from adaptive_kernels.cli import build_parser, checks
from adaptive_kernels.training import make_synthetic


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_threads_flag_takes_auto_or_a_count():
    parse = checks.thread_count_or_auto
    assert parse("auto") == "auto" == parse(" AUTO ") and parse("1") == 1
    for bad in ("0", "two", "100000"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"must be an integer in \[1, \d+\], got .*, or auto"):
            parse(bad)


@pytest.mark.parametrize("command, default", [("eval", "auto"), ("calibrate", "auto"), ("demo", "auto"),
                                              ("train", None)])
def test_auto_is_the_default_where_the_command_measures_it(command, default):
    required = {"eval": ["--checkpoint", "c.pt"], "calibrate": ["--checkpoint", "c.pt", "--out", "o.pt"], "demo": [],
                "train": ["--model", "resnet20_adn", "--data", "synthetic", "--out", "o", "--epochs", "1"]}[command]
    parser = build_parser()
    assert parser.parse_args([command, *required]).threads == default
    assert parser.parse_args([command, *required, "--threads", "1"]).threads == 1
    if default is None:  # train has no measurement of its own: auto is refused, not ignored
        with pytest.raises(SystemExit):
            parser.parse_args([command, *required, "--threads", "auto"])


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("one_is_faster", [True, False])
def test_auto_keeps_the_faster_of_torchs_count_and_one(one_is_faster):
    speeds = {1: 200.0, 2: 100.0} if one_is_faster else {1: 100.0, 2: 200.0}
    seen, lines = [], []

    def measure():
        seen.append(torch.get_num_threads())
        return speeds[torch.get_num_threads()]

    assert checks.faster_thread_count(measure, lines.append) == 200.0
    assert seen == [2, 1] and torch.get_num_threads() == (1 if one_is_faster else 2)
    assert lines == ([("[threads] 1 thread runs faster than 2 on this machine (200 vs 100 per s): using 1 "
                      "(--threads N to choose)")] if one_is_faster else [])


@pytest.mark.usefixtures("two_threads")
def test_auto_threads_measures_the_model_and_picks_a_valid_count():
    model = create_model("resnet20_adn", num_classes=10, in_chans=1, width=2)
    lines = []
    checks.auto_threads(model, make_synthetic(image_size=8), "cpu", lines.append)
    assert torch.get_num_threads() in (1, 2) and len(lines) == (torch.get_num_threads() == 1)
    assert model.training  # measured in eval mode, given back as it came
    torch.set_num_threads(2)
    checks.auto_threads(model, make_synthetic(image_size=8), "meta", lines.append)  # not a CPU: nothing to choose
    assert torch.get_num_threads() == 2


def test_phase_lines_show_the_packages_progress_while_a_command_runs(capsys):
    logger = logging.getLogger("adaptive_kernels.export.onnx")
    with checks.phase_lines():
        logger.info("[export] tracing X ...")
        logger.warning("two\nlines")
    logger.info("[export] after the command")
    assert capsys.readouterr().err == "[export] tracing X ...\nwarning: two lines\n"
