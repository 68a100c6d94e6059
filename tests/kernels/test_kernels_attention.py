"""attention (SDPA and Triton backends) against attention_ref computed in float64."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from adaptive_kernels.kernels import _common, attention, attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_qkv(b, h, lq, d, lk=None, dtype=torch.float32, seed=0, packed=False):
    """q, k, v: (B, H, L, D). packed=True slices them out of one (B, L, 3, H, D) qkv tensor, as a ViT block does."""
    g = torch.Generator().manual_seed(seed)
    lk = lq if lk is None else lk
    if packed:
        qkv = torch.randn(b, lq, 3, h, d, generator=g).to(dtype).to(DEVICE).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]
    return tuple(torch.randn(b, h, n, d, generator=g).to(dtype).to(DEVICE) for n in (lq, lk, lk))


def make_bias(shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(*shape, generator=g) * 2
    bias[..., 0, -1] = -100.0  # Swin's shifted-window mask value
    return bias.to(dtype).to(DEVICE)


BIASES = {  # given q of (B=4, H=2, L=13, D)
    "none": None,
    "per head (H, L, L)": (2, 13, 13),
    "per window (nb=2, 1, L, L)": (2, 1, 13, 13),
    "window+head (nb=2, H, L, L)": (2, 2, 13, 13),
    "per batch (B, 1, L, L)": (4, 1, 13, 13),
}


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("bias_shape", BIASES.values(), ids=BIASES.keys())
def test_attention_fp32(backend, bias_shape):
    q, k, v = make_qkv(4, 2, 13, 24)  # odd L, head_dim 24 is not a power of two
    bias = None if bias_shape is None else make_bias(bias_shape)
    ref = attention_ref(q.double(), k.double(), v.double(), None if bias is None else bias.double())
    y = attention(q, k, v, bias, backend=backend)
    assert y.shape == q.shape
    assert rel_err(y, ref) < 1e-4


def test_attention_triton_strided_qkv_cross_lengths_scale_out():
    q, k, v = make_qkv(2, 3, 17, 16, packed=True, seed=2)
    assert not q.is_contiguous()
    out = torch.empty(2, 17, 3, 16, device=DEVICE).transpose(1, 2)  # writes straight into (B, L, H, D)
    y = attention(q, k, v, backend="triton", scale=0.3, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(out, attention_ref(q.double(), k.double(), v.double(), scale=0.3)) < 1e-4
    q, k, v = make_qkv(1, 2, 5, 16, lk=21, seed=3)  # Lq != Lk
    assert rel_err(attention(q, k, v, backend="triton"), attention_ref(q.double(), k.double(), v.double())) < 1e-4


@pytest.mark.parametrize("bit", [0, 1], ids=["skipped", "runs"])
def test_attention_triton_early_exit(bit):
    q, k, v = make_qkv(1, 2, 9, 16, seed=4)
    mask = torch.tensor([bit], dtype=torch.int32, device=DEVICE)
    poison = torch.full_like(q, float("nan"))
    attention(q, k, v, backend="triton", mask=mask, exit_index=0, out=poison)
    if bit == 0:
        assert torch.isnan(poison).all(), "a skipped kernel wrote to its output"
    else:
        assert rel_err(poison, attention_ref(q.double(), k.double(), v.double())) < 1e-4


def _check_low_precision(dtype, backend, b, h, lq, d, bias_shape):
    q, k, v = make_qkv(b, h, lq, d, dtype=dtype, seed=5)
    bias = None if bias_shape is None else make_bias(bias_shape, dtype=dtype)
    ref = attention_ref(q.double(), k.double(), v.double(), None if bias is None else bias.double())
    y = attention(q, k, v, bias, backend=backend)
    assert y.dtype == dtype
    ours, theirs = rel_err(y, ref), rel_err(attention_ref(q, k, v, bias), ref)
    assert ours <= 2 * theirs, f"{dtype} {backend}: error {ours:.2e} vs torch {theirs:.2e}"


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_attention_fp16(backend):
    _check_low_precision(torch.float16, backend, 4, 2, 13, 24, (2, 2, 13, 13))


@pytest.mark.skipif(_common.INTERPRET, reason="bf16 math does not work in Triton's interpreter (checked on the GPU)")
def test_attention_bf16_triton():
    _check_low_precision(torch.bfloat16, "triton", 4, 2, 13, 24, (2, 2, 13, 13))


@pytest.mark.parametrize(
    "over,error,match",
    [
        ({"backend": "flash"}, ValueError, "backend='flash'"),
        ({"q": torch.randn(2, 5, 8)}, ValueError, "4-D"),
        ({"k": torch.randn(1, 2, 5, 8).half()}, TypeError, "k has dtype"),
        ({"v": torch.randn(1, 2, 6, 8)}, ValueError, "k and v must be"),
        ({"q": torch.randn(1, 2, 8, 5).transpose(2, 3)}, ValueError, "unit stride"),
        ({"attn_bias": torch.randn(3, 5, 5)}, ValueError, r"attn_bias\[:, None\]"),
        ({"attn_bias": torch.randn(1, 3, 5, 5)}, ValueError, "does not fit"),
        ({"attn_bias": torch.randn(2, 5, 5).half()}, TypeError, "attn_bias has dtype"),
        (
            {"mask": torch.ones(1, dtype=torch.int32), "exit_index": 0, "out": torch.empty(1, 2, 5, 8)},
            ValueError,
            "needs backend='triton'",
        ),
        ({"backend": "triton", "mask": torch.ones(1, dtype=torch.int32), "exit_index": 0}, ValueError, "needs out="),
        ({"out": torch.empty(1, 2, 5, 4)}, ValueError, "out must be"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_attention_rejects_bad_input(over, error, match):
    args = {"q": torch.randn(1, 2, 5, 8), "k": torch.randn(1, 2, 5, 8), "v": torch.randn(1, 2, 5, 8)}
    args.update(over)
    args = {k_: (t.to(DEVICE) if torch.is_tensor(t) else t) for k_, t in args.items()}
    with pytest.raises(error, match=match):
        attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_attention_triton_cpu_tensors_need_interpreter(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="attention_ref"):
        attention(q, q, q, backend="triton")


@pytest.mark.gpu
def test_attention_capturable_in_cuda_graph():
    for backend in ("sdpa", "triton"):
        q, k, v = make_qkv(8, 3, 49, 32, dtype=torch.float16, seed=6)
        bias = make_bias((4, 3, 49, 49), dtype=torch.float16)
        out = torch.empty_like(q)
        attention(q, k, v, bias, backend=backend, out=out)  # warm-up (and autotuning) before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            attention(q, k, v, bias, backend=backend, out=out)
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        ref = attention_ref(q.double(), k.double(), v.double(), bias.double())
        assert rel_err(out, ref) < 1e-2, backend


GPU_SHAPES = {  # b, h, l, d, bias
    "vit b1": (1, 12, 197, 64, None),
    "vit b64": (64, 12, 197, 64, None),
    "swin s1 b8 (nW=64)": (8 * 64, 3, 49, 32, (64, 3, 49, 49)),
    "swin s3 b8 (nW=4)": (8 * 4, 12, 49, 32, (4, 1, 49, 49)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_attention_gpu_realistic_fp16(shape, backend):
    b, h, length, d, bias_shape = shape
    _check_low_precision(torch.float16, backend, b, h, length, d, bias_shape)
