"""The split-K heuristic at the layer shapes that matter, on a 132-SM H100/H200: every groups=1 conv and every linear
of ResNet-50-ADN (batch 1 and 64) and ViT-B/16-ADN (batch 1) at 224x224, taken from the lowered programs. The
heuristic counts the output tiles of the config that launches untuned (conv 128x64, linear 64x128) and takes the
largest split with tiles * split <= 2 * 132 = 264 that leaves every split >= 4 K steps of 64. The expected splits
are worked out by hand below (tiles = ceil(M / BM) * ceil(N / BN))."""

from __future__ import annotations

import importlib

import pytest
import torch

from adaptive_kernels import create_model
from adaptive_kernels.engine.cuda.lowering import lower
from adaptive_kernels.engine.cuda.ops import Conv, Linear
from adaptive_kernels.kernels.backend import STRUCTURE_ONLY
from adaptive_kernels.kernels.split_k import choose_split_k

conv2d_module = importlib.import_module("adaptive_kernels.kernels.conv2d")
linear_module = importlib.import_module("adaptive_kernels.kernels.linear")
SMS = 132

# (op, M, N, K steps) -> split
RESNET50_B1 = {
    ("conv", 12544, 64, 3): 1,  # stem 7x7 (flat K of 147): 98 tiles, K too short
    ("conv", 3136, 64, 1): 1,  # layer1 1x1 64->64
    ("conv", 3136, 64, 4): 1,  # layer1 1x1 256->64
    ("conv", 3136, 64, 9): 2,  # layer1 3x3: 25 tiles; split 4 would leave < 4 of 9 steps
    ("conv", 3136, 256, 1): 1,  # layer1 1x1 ->256 and its downsample
    ("conv", 3136, 128, 4): 1,  # layer2 first 1x1 256->128
    ("conv", 784, 128, 18): 4,  # layer2 3x3: 14 tiles, 18 steps
    ("conv", 784, 128, 8): 2,  # layer2 1x1 512->128
    ("conv", 784, 512, 2): 1,  # layer2 1x1 ->512
    ("conv", 784, 512, 4): 1,  # layer2 downsample 256->512
    ("conv", 784, 256, 8): 2,  # layer3 first 1x1 512->256: 28 tiles
    ("conv", 196, 256, 36): 8,  # layer3 3x3: 8 tiles; 16 would leave < 4 of 36 steps
    ("conv", 196, 256, 16): 4,  # layer3 1x1 1024->256
    ("conv", 196, 1024, 4): 1,  # layer3 1x1 ->1024
    ("conv", 196, 1024, 8): 2,  # layer3 downsample 512->1024: 32 tiles
    ("conv", 196, 512, 16): 4,  # layer4 first 1x1 1024->512: 16 tiles
    ("conv", 49, 512, 72): 16,  # layer4 3x3: 8 tiles * 16 = 128
    ("conv", 49, 512, 32): 8,  # layer4 1x1 2048->512
    ("conv", 49, 2048, 8): 2,  # layer4 1x1 ->2048: 32 tiles
    ("conv", 49, 2048, 16): 4,  # layer4 downsample 1024->2048: 32 tiles * 4 = 128
    ("linear", 1, 1000, 32): 8,  # head: 8 tiles, 32 steps
}
# batch 64: every conv has >= 200 tiles (layer4 3x3: 25 * 8), so none splits; the head still has only 8 tiles
RESNET50_B64 = {(op, m * 64 if op == "conv" else 64, n, k): 1 for op, m, n, k in RESNET50_B1}
RESNET50_B64[("linear", 64, 1000, 32)] = 8
VIT_B16_B1 = {
    ("linear", 196, 768, 12): 2,  # patch embedding (768 = 3*16*16 inputs): 24 tiles; 4 would leave < 4 of 12 steps
    ("linear", 197, 2304, 12): 2,  # qkv: 72 tiles * 2 = 144
    ("linear", 197, 768, 12): 2,  # out_proj: 24 tiles
    ("linear", 197, 3072, 12): 2,  # fc1: 96 tiles * 2 = 192
    ("linear", 197, 768, 48): 8,  # fc2: 24 tiles * 8 = 192 (16: 384 > 264)
    ("linear", 1, 1000, 12): 2,  # head
}


def _chosen_splits(name: str, batch: int) -> dict[tuple, int]:
    with torch.device("meta"):
        model = create_model(name)
    program = lower(model, (3, 224, 224), kernels=STRUCTURE_ONLY, dtype=torch.float16, device="meta")
    chosen = {}
    for op, _ in program.flat_ops():
        if isinstance(op, Conv) and op.groups == 1:
            ho, wo, n = op.out.shape
            k_steps = conv2d_module.max_split_k(op.x.shape[-1], op.kernel_size)
            key = ("conv", batch * ho * wo, n, k_steps)
            chosen[key] = choose_split_k(batch * ho * wo, n, k_steps, SMS, tile=conv2d_module.GEMM_TILE)
        elif isinstance(op, Linear):
            m = batch * int(torch.tensor(op.x.shape[:-1]).prod())
            n, k_steps = op.out.shape[-1], linear_module.linear_max_split_k(op.x.shape[-1])
            chosen[("linear", m, n, k_steps)] = choose_split_k(m, n, k_steps, SMS, tile=linear_module.TILE)
    return chosen


def test_the_heuristic_counts_the_default_config_tiles():
    assert conv2d_module.GEMM_TILE == (128, 64) and linear_module.TILE == (64, 128)
    assert linear_module.linear_max_split_k(3072) == 48 and linear_module.linear_max_split_k(768) == 12


@pytest.mark.parametrize(
    "name,batch,expected",
    [("resnet50_adn", 1, RESNET50_B1), ("resnet50_adn", 64, RESNET50_B64), ("vit_b_16_adn", 1, VIT_B16_B1)],
    ids=["resnet50-b1", "resnet50-b64", "vit_b_16-b1"],
)
def test_split_k_choices_at_model_layer_shapes(name, batch, expected):
    assert _chosen_splits(name, batch) == expected
