"""Swin-T-ADN: torchvision's Swin Transformer (v1) with skippable blocks, in the authors' layout.

The module tree follows the authors' release (github.com/wchkang/depth, ``models/swin_transformer.py``),
so their ADN checkpoints load with a plain ``load_state_dict``. It differs from torchvision's only in
where the patch embedding lives (``pre`` instead of ``features.0``); ``load_upstream_state_dict`` maps
torchvision keys (``features.0.*`` -> ``pre.*``, ``features.{j}.*`` -> ``features.{j-1}.*``)::

    pre.0                       Conv2d(in_chans, 96, 4, stride=4); pre.1 = permute to (N, H, W, C)
    pre.2                       LayerNorm(96)
    features.0                  stage 0: 2 SwinBlocks, dim 96        (1 mandatory + 1 skippable)
    features.1                  PatchMerging(96 -> 192)    follows stage 1's flag
    features.2                  stage 1: 2 SwinBlocks, dim 192       (1 + 1)
    features.3                  PatchMerging(192 -> 384)   follows stage 2's flag
    features.4                  stage 2: 6 SwinBlocks, dim 384       (3 + 3)
    features.5                  PatchMerging(384 -> 768)   follows stage 3's flag
    features.6                  stage 3: 2 SwinBlocks, dim 768       (1 + 1)
    norm, head                  final LayerNorm(768), Linear(768, num_classes)

    SwinBlock: norm1, attn.{qkv, proj, relative_position_bias_table, relative_position_index}, norm2,
               mlp.0 / mlp.3 (Linear), and in mandatory blocks norm1_skip, norm2_skip
    PatchMerging: reduction (Linear 4C -> 2C, no bias), norm, norm_skip (LayerNorm(4C))

A mandatory block, and the patch merging before a stage, normalise with their ``_skip`` norms when
that stage's skippable blocks are skipped; the mandatory blocks then also run without stochastic depth
(as released). Attention math is torchvision's: windows of 7x7, every second block shifted by 3 with
the attention mask, feature maps padded to a multiple of the window, no shift along a dimension that
fits in one window.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .base import ADNModel, check_positive_int, check_probability
from .registry import register_model
from .skip import SkipConfig, SkipLike


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth ("row" mode): zero a residual branch per sample with probability ``p``."""
    if not training or p == 0.0:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module (it keeps ``pre.2`` at index 2, as in the released layout)."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def shift_region(size: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Region id (0, 1, 2) of each row of a padded, cyclically shifted map; rows from different regions
    were not neighbours before the shift and must not attend to each other. One region if unshifted."""
    idx = torch.arange(size, device=device)
    if shift == 0:
        return torch.zeros_like(idx)
    return (idx >= size - window).long() + (idx >= size - shift).long()


class ShiftedWindowAttention(nn.Module):
    """Window multi-head self-attention with relative position bias; x: (N, H, W, C) -> (N, H, W, C).

    ``qkv`` and ``proj`` are called as modules (their MACs are counted by their own hooks);
    ``attention_macs`` adds only the two attention matmuls, QK^T and AV.
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        shift_size: int,
        num_heads: int,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # index[a * w*w + b] of the table entry for query position a and key position b of a window
        row, col = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
        row, col = row.flatten(), col.flatten()
        d_row = row[:, None] - row[None, :] + window_size - 1
        d_col = col[:, None] - col[None, :] + window_size - 1
        self.register_buffer("relative_position_index", (d_row * (2 * window_size - 1) + d_col).flatten())

    def padded_size(self, h: int, w: int) -> tuple[int, int, int, int]:
        """Padded size and effective shifts: no shift along a dimension that fits in one window."""
        ws = self.window_size
        pad_h, pad_w = -(-h // ws) * ws, -(-w // ws) * ws
        shift_h = self.shift_size if ws < pad_h else 0
        shift_w = self.shift_size if ws < pad_w else 0
        return pad_h, pad_w, shift_h, shift_w

    def attention_macs(self, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
        """MACs of QK^T and AV: per window 2 * (w*w)^2 * C (heads split C)."""
        n, h, w, c = inputs[0].shape
        pad_h, pad_w, _, _ = self.padded_size(h, w)
        num_windows = (pad_h // self.window_size) * (pad_w // self.window_size)
        return 2 * n * num_windows * self.window_size**4 * c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        ws, heads = self.window_size, self.num_heads
        pad_h, pad_w, shift_h, shift_w = self.padded_size(h, w)
        x = F.pad(x, (0, 0, 0, pad_w - w, 0, pad_h - h))
        shifted = shift_h > 0 or shift_w > 0
        if shifted:
            x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))

        # (N, pad_h, pad_w, C) -> (N * num_windows, ws*ws, C), windows in row-major order
        gh, gw = pad_h // ws, pad_w // ws
        x = x.view(n, gh, ws, gw, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(n * gh * gw, ws * ws, c)
        q, k, v = self.qkv(x).view(x.shape[0], ws * ws, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)  # (N * windows, heads, ws*ws, ws*ws)
        bias = self.relative_position_bias_table[self.relative_position_index]
        attn = attn + bias.view(ws * ws, ws * ws, heads).permute(2, 0, 1)
        if shifted:
            rows, cols = shift_region(pad_h, ws, shift_h, x.device), shift_region(pad_w, ws, shift_w, x.device)
            region = (rows[:, None] * 3 + cols[None, :]).view(gh, ws, gw, ws).permute(0, 2, 1, 3).reshape(gh * gw, -1)
            # -100 (not -inf), as upstream: exp(-100) vanishes next to the unmasked logits
            mask = (region[:, None, :] != region[:, :, None]).to(attn.dtype) * -100.0
            attn = (attn.view(n, gh * gw, heads, ws * ws, ws * ws) + mask[None, :, None]).flatten(0, 1)
        attn = F.dropout(attn.softmax(dim=-1), p=self.attention_dropout, training=self.training)
        x = (attn @ v).transpose(1, 2).reshape(x.shape[0], ws * ws, c)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)

        x = x.view(n, gh, gw, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(n, pad_h, pad_w, c)
        if shifted:
            x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
        return x[:, :h, :w].contiguous()


class SwinBlock(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, with stochastic depth; x: (N, H, W, C).

    ``forward(x, skip_stage)``: ``skip_stage`` is the skip flag of the block's stage. A skippable block
    returns ``x`` unchanged when its stage is skipped; a mandatory block then uses its ``_skip`` norms
    and no stochastic depth.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        stage: int,
        skippable: bool,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        stochastic_depth_prob: float = 0.0,
    ):
        super().__init__()
        self.stage = stage
        self.skippable = skippable
        self.stochastic_depth_prob = stochastic_depth_prob
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ShiftedWindowAttention(dim, window_size, shift_size, num_heads, attention_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        # indices 0 and 3 hold the linears, as in torchvision's MLP (Linear, GELU, Dropout, Linear, Dropout)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )
        if not skippable:
            self.norm1_skip = nn.LayerNorm(dim)
            self.norm2_skip = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, skip_stage: bool) -> torch.Tensor:
        if skip_stage and self.skippable:
            return x
        if skip_stage:
            x = x + self.attn(self.norm1_skip(x))
            return x + self.mlp(self.norm2_skip(x))
        p = self.stochastic_depth_prob
        x = x + drop_path(self.attn(self.norm1(x)), p, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), p, self.training)


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), 2C), odd sizes zero-padded.

    Belongs to the stage it feeds (``stage``) and uses ``norm_skip`` when that stage is skipped.
    """

    skippable = False

    def __init__(self, dim: int, stage: int):
        super().__init__()
        self.stage = stage
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)
        self.norm_skip = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, skip_stage: bool) -> torch.Tensor:
        h, w = x.shape[1], x.shape[2]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # channel order (even row, even col), (odd, even), (even, odd), (odd, odd) as upstream
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm_skip(x) if skip_stage else self.norm(x))


class SwinStage(nn.Sequential):
    """The blocks of one stage; ``forward(x, skip_stage)`` passes the stage's flag to every block."""

    skippable = False

    def __init__(self, blocks: list[SwinBlock], stage: int):
        super().__init__(*blocks)
        self.stage = stage

    def forward(self, x: torch.Tensor, skip_stage: bool) -> torch.Tensor:
        for block in self:
            x = block(x, skip_stage)
        return x


class SwinTransformerADN(ADNModel):
    """Swin Transformer with skippable blocks (see the module docstring for layout and split).

    ``forward(x, skip=None)``: x (N, in_chans, H, W), any H, W >= patch size -> logits (N, num_classes).
    """

    def __init__(
        self,
        embed_dim: int,
        depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        patch_size: int = 4,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        stochastic_depth_prob: float = 0.1,
        num_classes: int = 1000,
        in_chans: int = 3,
    ):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("patch_size", patch_size), ("window_size", window_size),
                            ("num_classes", num_classes), ("in_chans", in_chans)):
            check_positive_int(name, value)
        for name, value in (("dropout", dropout), ("attention_dropout", attention_dropout),
                            ("stochastic_depth_prob", stochastic_depth_prob)):
            check_probability(name, value)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        depths, num_heads = tuple(depths), tuple(num_heads)
        if not depths or len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} must list one value per stage (>= 1 stage)")
        for stage, (depth, heads) in enumerate(zip(depths, num_heads)):
            check_positive_int(f"num_heads[{stage}]", heads)
            if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
                raise ValueError(f"every stage needs >= 2 blocks to have a skippable half, got depths={depths}")
            if (embed_dim * 2**stage) % heads != 0:
                raise ValueError(
                    f"stage {stage} has {embed_dim * 2**stage} channels (embed_dim * 2^stage), not a multiple of "
                    f"its {heads} heads"
                )
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.min_input_size = patch_size  # one patch; smaller maps are padded to a window (LayerNorm: any batch)
        self.num_skippable_stages = len(depths)
        self.pre = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size),
            Permute((0, 2, 3, 1)),
            nn.LayerNorm(embed_dim),
        )
        layers: list[nn.Module] = []
        total_blocks, block_id = sum(depths), 0
        for stage, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2**stage
            if stage > 0:
                layers.append(PatchMerging(dim // 2, stage))
            blocks = []
            for i in range(depth):
                blocks.append(
                    SwinBlock(
                        dim,
                        heads,
                        window_size,
                        shift_size=0 if i % 2 == 0 else window_size // 2,
                        stage=stage,
                        skippable=i >= depth // 2,  # the second half of every stage (released split)
                        mlp_ratio=mlp_ratio,
                        dropout=dropout,
                        attention_dropout=attention_dropout,
                        stochastic_depth_prob=stochastic_depth_prob * block_id / (total_blocks - 1),
                    )
                )
                block_id += 1
            layers.append(SwinStage(blocks, stage))
        self.features = nn.Sequential(*layers)
        num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(num_features)
        self.head = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def check_input(self, x: torch.Tensor, *, match_parameters: bool = True) -> None:
        super().check_input(x, match_parameters=match_parameters)
        if min(x.shape[-2:]) < self.patch_size:
            raise ValueError(f"images must be at least {self.patch_size}x{self.patch_size}, got {tuple(x.shape[-2:])}")

    def forward(self, x: torch.Tensor, skip: SkipLike = None) -> torch.Tensor:
        """x: (N, in_chans, H, W) -> logits (N, num_classes)."""
        self.check_input(x)
        skip = self.parse_skip(skip)
        return self.head(self.norm(self._features(self.pre(x), skip)).mean(dim=(1, 2)))

    def _features(self, x: torch.Tensor, skip: SkipConfig) -> torch.Tensor:
        for layer in self.features:
            x = layer(x, skip[layer.stage])
        return x

    def _upstream_key(self, key: str) -> str:
        # torchvision: features.0 = patch embedding, features.1..7 = stages and mergings
        m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
        if m is None:
            return key
        j, rest = int(m.group(1)), m.group(2)
        return f"pre.{rest}" if j == 0 else f"features.{j - 1}.{rest}"


@register_model
def swin_t_adn(
    num_classes: int = 1000, in_chans: int = 3, stochastic_depth_prob: float = 0.1, **kwargs
) -> SwinTransformerADN:
    """Swin-T-ADN: dims 96-768, depths 2,2,6,2 (mandatory/skippable 1/1, 1/1, 3/3, 1/1), heads 3,6,12,24.

    ``stochastic_depth_prob`` defaults to the authors' 0.1 (torchvision's swin_t uses 0.2).
    Further kwargs: ``dropout``, ``attention_dropout``, ``window_size``.
    """
    return SwinTransformerADN(
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        stochastic_depth_prob=stochastic_depth_prob,
        num_classes=num_classes,
        in_chans=in_chans,
        **kwargs,
    )
