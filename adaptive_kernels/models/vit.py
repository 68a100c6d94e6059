"""ViT-ADN and DeiT-ADN: torchvision's VisionTransformer with skippable encoder blocks.

Layout and state-dict names are torchvision's (``torchvision.models.vision_transformer``) plus the
skip-aware LayerNorms of the authors' release (github.com/wchkang/depth, ``models/vision_transformer.py``),
so both torchvision checkpoints (via ``load_upstream_state_dict``) and the authors' ADN checkpoints
(plain ``load_state_dict``) load::

    conv_proj                                    Conv2d(in_chans, D, patch, stride=patch)
    class_token                                  (1, 1, D)
    encoder.pos_embedding                        (1, 1 + (image_size // patch)**2, D)
    encoder.layers.encoder_layer_{i}.ln_1        LayerNorm(D, eps=1e-6)
    encoder.layers.encoder_layer_{i}.self_attention   nn.MultiheadAttention(D, heads, batch_first=True)
    encoder.layers.encoder_layer_{i}.ln_2
    encoder.layers.encoder_layer_{i}.mlp.0 / mlp.3    Linear(D, mlp_dim) / Linear(mlp_dim, D)
    encoder.layers.encoder_layer_{i}.ln_1_skip / ln_2_skip   only in mandatory blocks
    encoder.ln                                   final LayerNorm (not duplicated)
    heads.head                                   Linear(D, num_classes)

Depth split (as released): the 12 encoder blocks form 4 "stages" of 3; block ``i`` belongs to stage
``i // 3`` and the last block of each stage (2, 5, 8, 11) is skippable. A mandatory block normalises
with ``ln_1_skip``/``ln_2_skip`` when its stage's skippable block is skipped.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from .base import ADNModel, check_positive_int, check_probability
from .registry import register_model
from .skip import SkipConfig, SkipLike

BLOCKS_PER_STAGE = 3


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block ``x + MHA(LN(x))`` then ``x + MLP(LN(x))``; x: (N, L, D).

    ``forward(x, skip_stage)``: ``skip_stage`` is the skip flag of the block's stage. A skippable block
    returns ``x`` unchanged when its stage is skipped; a mandatory block then uses its ``_skip`` norms.
    """

    def __init__(
        self,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        stage: int,
        skippable: bool,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ):
        super().__init__()
        self.stage = stage
        self.skippable = skippable
        self.ln_1 = _layer_norm(hidden_dim)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = _layer_norm(hidden_dim)
        # indices 0 and 3 hold the linears, as in torchvision's MLP (Linear, GELU, Dropout, Linear, Dropout)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, hidden_dim),
            nn.Dropout(dropout),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)
        if not skippable:
            self.ln_1_skip = _layer_norm(hidden_dim)
            self.ln_2_skip = _layer_norm(hidden_dim)

    def forward(self, x: torch.Tensor, skip_stage: bool) -> torch.Tensor:
        if skip_stage and self.skippable:
            return x
        ln_1, ln_2 = (self.ln_1_skip, self.ln_2_skip) if skip_stage else (self.ln_1, self.ln_2)
        y = ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(ln_2(x))


class Encoder(nn.Module):
    """Position embedding, the encoder blocks and the final LayerNorm; x: (N, L, D) -> (N, L, D)."""

    def __init__(
        self,
        seq_length: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float,
        attention_dropout: float,
    ):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(num_layers):
            layers[f"encoder_layer_{i}"] = EncoderBlock(
                num_heads,
                hidden_dim,
                mlp_dim,
                stage=i // BLOCKS_PER_STAGE,
                skippable=i % BLOCKS_PER_STAGE == BLOCKS_PER_STAGE - 1,
                dropout=dropout,
                attention_dropout=attention_dropout,
            )
        self.layers = nn.Sequential(layers)
        self.ln = _layer_norm(hidden_dim)

    def forward(self, x: torch.Tensor, skip: SkipConfig) -> torch.Tensor:
        x = self.dropout(x + self.pos_embedding)
        for block in self.layers:
            x = block(x, skip[block.stage])
        return self.ln(x)


class VisionTransformerADN(ADNModel):
    """ViT with skippable encoder blocks (see the module docstring for layout and split).

    ``forward(x, skip=None)``: x (N, in_chans, image_size, image_size) -> logits (N, num_classes).
    The input size is fixed by the position embedding (``image_size``), as in torchvision.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        num_classes: int = 1000,
        in_chans: int = 3,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ):
        super().__init__()
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("num_layers", num_layers),
                            ("num_heads", num_heads), ("hidden_dim", hidden_dim), ("mlp_dim", mlp_dim),
                            ("num_classes", num_classes), ("in_chans", in_chans)):
            check_positive_int(name, value)
        check_probability("dropout", dropout)
        check_probability("attention_dropout", attention_dropout)
        if hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim={hidden_dim} must be a multiple of num_heads={num_heads}")
        if image_size % patch_size != 0:
            raise ValueError(f"image_size={image_size} is not a multiple of the patch size {patch_size}")
        if num_layers % BLOCKS_PER_STAGE != 0:
            raise ValueError(f"num_layers={num_layers} must be a multiple of {BLOCKS_PER_STAGE} (blocks per stage)")
        self.image_size = image_size
        self.input_size = (image_size, image_size)  # what macs() counts at by default
        self.min_input_size = self.max_input_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.in_chans = in_chans
        self.num_skippable_stages = num_layers // BLOCKS_PER_STAGE

        self.conv_proj = nn.Conv2d(in_chans, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        seq_length = (image_size // patch_size) ** 2 + 1
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))

        # torchvision's initialisation (the classifier starts at zero, so fresh logits are all 0)
        fan_in = in_chans * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    def check_input(self, x: torch.Tensor, *, match_parameters: bool = True) -> None:
        super().check_input(x, match_parameters=match_parameters)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images (the position embedding fixes the size), "
                f"got {x.shape[-2]}x{x.shape[-1]}; build the model with image_size=... to change it"
            )

    def forward(self, x: torch.Tensor, skip: SkipLike = None) -> torch.Tensor:
        """x: (N, in_chans, H, W) with H = W = image_size -> logits (N, num_classes)."""
        self.check_input(x)
        skip = self.parse_skip(skip)
        n = x.shape[0]
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (N, L, D), patches in row-major order
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = self.encoder(x, skip)
        return self.heads(x[:, 0])

    def _upstream_key(self, key: str) -> str:
        # torchvision names, except that old ViT checkpoints call the MLP linears linear_1/linear_2
        return key.replace(".mlp.linear_1.", ".mlp.0.").replace(".mlp.linear_2.", ".mlp.3.")


def _vit(
    patch_size: int,
    hidden_dim: int,
    num_heads: int,
    mlp_dim: int,
    num_classes: int,
    in_chans: int,
    image_size: int,
    **kwargs,
) -> VisionTransformerADN:
    return VisionTransformerADN(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=12,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
        num_classes=num_classes,
        in_chans=in_chans,
        **kwargs,
    )


@register_model
def vit_b_16_adn(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224, **kwargs) -> VisionTransformerADN:
    """ViT-B/16-ADN. Further kwargs: ``dropout``, ``attention_dropout``."""
    return _vit(16, 768, 12, 3072, num_classes, in_chans, image_size, **kwargs)


@register_model
def vit_b_32_adn(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224, **kwargs) -> VisionTransformerADN:
    """ViT-B/32-ADN. Further kwargs: ``dropout``, ``attention_dropout``."""
    return _vit(32, 768, 12, 3072, num_classes, in_chans, image_size, **kwargs)


@register_model
def deit_tiny_adn(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224, **kwargs) -> VisionTransformerADN:
    """DeiT-Tiny-ADN (D=192, 3 heads, patch 16, no distillation token) in torchvision's ViT layout."""
    return _vit(16, 192, 3, 768, num_classes, in_chans, image_size, **kwargs)


@register_model
def deit_small_adn(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224, **kwargs) -> VisionTransformerADN:
    """DeiT-Small-ADN (D=384, 6 heads, patch 16, no distillation token) in torchvision's ViT layout."""
    return _vit(16, 384, 6, 1536, num_classes, in_chans, image_size, **kwargs)
