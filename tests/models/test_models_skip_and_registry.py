"""Skip-configuration parsing and the model registry (no model building needed)."""

import sys

import numpy as np
import pytest
import torch

import adaptive_kernels as ak
from adaptive_kernels import models
from adaptive_kernels._discovery import import_family_files
from adaptive_kernels.models import registry
from adaptive_kernels.models.skip import all_skip_configs, parse_skip, skip_to_str


def test_parse_skip_spellings():
    assert parse_skip(None, 4) == (False, False, False, False)
    assert parse_skip("super", 4) == (False,) * 4
    assert parse_skip("BASE", 4) == (True,) * 4
    assert parse_skip("TFfT", 4) == (True, False, False, True)
    assert parse_skip([True, 0, 1, False], 4) == (True, False, True, False)
    assert parse_skip((False, True), 2) == (False, True)
    # elements that are NumPy or torch scalars (iterating an array or a tensor gives those)
    assert parse_skip(tuple(np.array([True, False, True])), 3) == (True, False, True)
    assert parse_skip(list(torch.tensor([0, 1])), 2) == (False, True)
    assert parse_skip([np.int64(1), torch.tensor(False)], 2) == (True, False)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("TFT", "3 letters but this model has 4"),
        ("TFXZ", "unknown letter"),
        ([True, False], "2 entries but this model has 4"),
        ([True, False, 2, False], r"skip\[2\]=2 is not a bool"),
    ],
)
def test_parse_skip_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_skip(bad, 4)


def test_parse_skip_wrong_type():
    with pytest.raises(TypeError, match="skip must be None, 'super', 'base', a T/F string or a sequence of bools, got float"):
        parse_skip(3.5, 4)
    with pytest.raises(TypeError, match=r"skip=b'TFF' is bytes: give a str \(skip.decode\(\)\)"):
        parse_skip(b"TFF", 3)
    with pytest.raises(ValueError, match=r"skip\[0\]=0.5 is not a bool"):
        parse_skip([np.float32(0.5), True], 2)


def test_all_skip_configs_order():
    configs = all_skip_configs(3)
    assert len(configs) == 8 and len(set(configs)) == 8
    assert configs[0] == (False,) * 3 and configs[-1] == (True,) * 3
    assert skip_to_str(configs[1]) == "FFT"


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match="did you mean.*resnet50_adn"):
        ak.create_model("resnet50adn")
    with pytest.raises(ValueError, match="unknown model"):
        ak.create_model("no_such_thing_at_all")


def test_registry_has_every_model_of_the_issue():
    expected = {
        "resnet18_adn", "resnet34_adn", "resnet50_adn", "resnet101_adn", "mobilenet_v2_adn",
        "vit_b_16_adn", "vit_b_32_adn", "deit_tiny_adn", "deit_small_adn", "swin_t_adn",
        "resnet20_adn", "resnet56_adn",
    }
    assert expected <= set(ak.list_models())
    assert ak.list_models("resnet5*") == ["resnet50_adn", "resnet56_adn"]


def test_every_family_module_is_imported_and_registers_its_models():
    builders = {registry.get_builder(name).__module__ for name in ak.list_models()}
    assert {f"adaptive_kernels.models.{family}" for family in ("resnet", "mobilenetv2", "vit", "swin")} <= builders
    for pattern in ("resnet*_adn", "mobilenet_v2_adn", "vit_*_adn", "deit_*_adn", "swin_t_adn"):
        assert ak.list_models(pattern), pattern


def test_a_new_family_file_is_all_a_new_family_needs(tmp_path, monkeypatch):
    # models/__init__.py finds family files by discovery: a module next to the others registers its builders
    (tmp_path / "newfamily.py").write_text(
        "from adaptive_kernels.models.registry import register_model\n\n\n"
        "@register_model\ndef newfamily_adn():\n    return None\n"
    )
    monkeypatch.setattr(models, "__path__", [*models.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    try:
        import_family_files(models.__name__, models.__path__, shared=models.SHARED_MODULES)
        assert "newfamily_adn" in ak.list_models()
    finally:
        sys.modules.pop("adaptive_kernels.models.newfamily", None)
        vars(models).pop("newfamily", None)
