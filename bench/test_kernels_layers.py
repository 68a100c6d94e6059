"""Per-layer cost of the fused Triton kernels against what eager PyTorch runs for the same layer, fp16, batch 1
and 64, at ResNet-50 and ViT-B/16 layer shapes (plus the attention backends at ViT/Swin shapes).

Providers per layer:
  conv:      ``cudnn`` (the convolution alone, channels_last), ``cudnn+epilogue`` (conv, then F.batch_norm, ReLU,
             residual add, ReLU as separate ops: eager ResNet), ``triton_fused`` (adaptive_kernels.kernels.conv2d
             with the BN set selected by a mask bit, activation and residual fused; ``split_k="auto"``, and the
             row's ``split_k`` records the split-K it chose at the first call: by measurement, or the heuristic's
             with ADN_KERNEL_AUTOTUNE=0);
  linear:    ``cublas`` (F.linear with its bias), ``cublas+epilogue`` (F.linear, GELU, residual add as separate
             ops: eager ViT), ``triton_fused`` (kernels.linear, ``split_k="auto"``; the row's ``split_k`` records
             its choice, as for conv);
  attention: ``sdpa`` and ``triton`` (kernels.attention backends), Swin shapes with their window bias.
Each provider runs REPS times inside one CUDA graph (as in the engine: launch overhead is a graph node's, not the
CPU's) and a row's time is one layer call: graph time / REPS. The fused output is checked against the eager one
first (relative error < 1e-2). GPU only (``gpu`` mark). Rows: ``kernels_layers.json`` (bench/_harness.py keys;
``model`` = the layer, ``skip`` = "-"). The first call of a fused kernel per shape autotunes (seconds).

Goal (issue 4; a benchmark, not a test): at batch 64 each fused layer >= 0.9x the speed of the eager
``+epilogue`` provider, at batch 1 faster than it.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from bench import _harness as harness

pytestmark = pytest.mark.gpu

REPS = 20
BATCHES = (1, 64)
DTYPE = torch.float16

# name: (H, W, Cin, Cout, kernel, stride, padding, activation, residual) — ResNet-50 (v1.5) and ViT-B/16's patch conv
CONV_LAYERS = {
    "r50 stem 7x7/2 3-64": (224, 224, 3, 64, 7, 2, 3, "relu", False),
    "r50 l1 1x1 64-64": (56, 56, 64, 64, 1, 1, 0, "relu", False),
    "r50 l1 3x3 64-64": (56, 56, 64, 64, 3, 1, 1, "relu", False),
    "r50 l1 1x1 64-256 +res": (56, 56, 64, 256, 1, 1, 0, "none", True),
    "r50 l2 3x3/2 128-128": (56, 56, 128, 128, 3, 2, 1, "relu", False),
    "r50 l2 1x1 512-128": (28, 28, 512, 128, 1, 1, 0, "relu", False),
    "r50 l3 3x3 256-256": (14, 14, 256, 256, 3, 1, 1, "relu", False),
    "r50 l3 1x1 256-1024 +res": (14, 14, 256, 1024, 1, 1, 0, "none", True),
    "r50 l3 downsample 1x1/2 512-1024": (28, 28, 512, 1024, 1, 2, 0, "none", False),
    "r50 l4 3x3 512-512": (7, 7, 512, 512, 3, 1, 1, "relu", False),
    "r50 l4 1x1 2048-512": (7, 7, 2048, 512, 1, 1, 0, "relu", False),
    "r50 l4 1x1 512-2048 +res": (7, 7, 512, 2048, 1, 1, 0, "none", True),
    "vit patch 16x16/16 3-768": (224, 224, 3, 768, 16, 16, 0, "none", False),
}
# name: (tokens per image, K, N, activation, residual) — ViT-B/16 block linears
LINEAR_LAYERS = {
    "vit qkv 768-2304": (197, 768, 2304, "none", False),
    "vit proj 768-768 +res": (197, 768, 768, "none", True),
    "vit fc1 768-3072 gelu": (197, 768, 3072, "gelu", False),
    "vit fc2 3072-768 +res": (197, 3072, 768, "none", True),
}
# name: (images -> attention batch factor, heads, L, head_dim, windows (bias batch) or 0 for no bias)
ATTENTION_LAYERS = {
    "vit-b/16 attention": (1, 12, 197, 64, 0),
    "swin-t s1 window attention": (64, 3, 49, 32, 64),
    "swin-t s3 window attention": (4, 12, 49, 32, 4),
}
CONV_PROVIDERS = ("cudnn", "cudnn+epilogue", "triton_fused")
LINEAR_PROVIDERS = ("cublas", "cublas+epilogue", "triton_fused")
ATTENTION_PROVIDERS = ("sdpa", "triton")


def _graph_of(fn, reps: int):
    """Capture ``reps`` calls of ``fn`` in one CUDA graph (after warm-up/autotuning on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return graph


def _time_and_record(get_benchmark, rows, *, layer, provider, batch, fn, macs, extra):
    """Time ``fn`` as one call of a REPS-call graph; write and return its row (benchmark group: layer and batch)."""
    graph = _graph_of(fn, REPS)
    benchmark = get_benchmark()
    if benchmark is not None:
        benchmark.group = f"{layer} b{batch}"
    timing = harness.measure(graph.replay, benchmark)
    per_call = harness.Timing([t / REPS for t in timing.samples_us])
    row = harness.make_row(
        provider=provider,
        model=layer,
        skip="-",
        batch=batch,
        dtype=DTYPE,
        timing=per_call,
        macs=macs,
        metric="layer_latency",
        reps_per_graph=REPS,
        tflops=round(2 * macs * batch / (per_call.median_us * 1e6), 2),
        **extra,
    )
    rows.add(row)
    if benchmark is not None:
        benchmark.extra_info.update({k: row[k] for k in ("median_us", "p20_us", "p80_us", "gpu", "torch", "triton")})
    return row


def _check(fused: torch.Tensor, eager: torch.Tensor, what: str) -> float:
    err = harness.relative_error(fused, eager)
    if not err < 1e-2:  # also catches NaN
        pytest.fail(f"{what}: fused output differs from eager by relative error {err:.3g}; not timing a wrong result")
    return err


@functools.cache
def _conv_case(layer: str, batch: int):
    from adaptive_kernels.kernels import pack_conv2d_weight

    h, w, cin, cout, k, s, p, act, has_res = CONV_LAYERS[layer]
    dev = harness.DEVICE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, h, w, generator=g).to(dev, DTYPE).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(dev, DTYPE)
    weight = weight.contiguous(memory_format=torch.channels_last)
    bn = {  # eval-mode BatchNorm statistics and its folded form
        "mean": torch.randn(cout, generator=g) * 0.1,
        "var": torch.rand(cout, generator=g) + 0.5,
        "gamma": torch.rand(cout, generator=g) + 0.5,
        "beta": torch.randn(cout, generator=g) * 0.1,
    }
    bn = {name: t.to(dev) for name, t in bn.items()}
    scale = bn["gamma"] / torch.sqrt(bn["var"] + 1e-5)
    shift = bn["beta"] - bn["mean"] * scale
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    res = torch.randn(batch, cout, ho, wo, generator=g).to(dev, DTYPE).contiguous(memory_format=torch.channels_last)
    return {
        "x": x,
        "weight": weight,
        "w_packed": pack_conv2d_weight(weight),
        "bn": {k_: v.to(DTYPE) for k_, v in bn.items()},
        "scale": scale,
        "shift": shift,
        "res": res if has_res else None,
        "k": k,
        "s": s,
        "p": p,
        "act": act,
        "macs": cout * cin * k * k * ho * wo,
    }


@pytest.mark.parametrize("provider", CONV_PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES, ids=[f"b{b}" for b in BATCHES])
@pytest.mark.parametrize("layer", CONV_LAYERS)
def test_conv_layer(benchmark_or_none, rows, layer, batch, provider):
    from adaptive_kernels.kernels import Epilogue, conv2d
    from adaptive_kernels.kernels.conv2d import auto_split_k, conv2d_workspace_numel

    c = _conv_case(layer, batch)
    mask = torch.ones(4, dtype=torch.int32, device=harness.DEVICE)
    x_nhwc = c["x"].permute(0, 2, 3, 1)  # free: channels_last storage is NHWC
    res_nhwc = None if c["res"] is None else c["res"].permute(0, 2, 3, 1)
    bn = c["bn"]

    def eager(with_epilogue: bool) -> torch.Tensor:
        y = F.conv2d(c["x"], c["weight"], stride=c["s"], padding=c["p"])
        if not with_epilogue:
            return y
        y = F.batch_norm(y, bn["mean"], bn["var"], bn["gamma"], bn["beta"], training=False, eps=1e-5)
        if c["act"] == "relu":
            y = F.relu(y)
        if c["res"] is not None:
            y = F.relu(y + c["res"])
        return y

    y_ref = eager(True)
    out = torch.empty_like(y_ref.permute(0, 2, 3, 1).contiguous())
    n, cout, ho, wo = y_ref.shape
    # split-K scratch preallocated, as the engine does: the captured calls time the kernels, not an allocation
    workspace = torch.empty(
        conv2d_workspace_numel(n * ho * wo, cout, x_nhwc.shape[-1], c["k"], device=harness.DEVICE),
        device=harness.DEVICE,
        dtype=torch.float32,
    )

    # the BN table row is selected from the mask on the device, as the engine does (skip-aware BN: 2 rows, the stage's
    # bit in mask[0])
    epilogue = Epilogue(
        scale=torch.stack([c["scale"], c["scale"]]),
        shift=torch.stack([c["shift"], c["shift"]]),
        select_index=0,
        activation=c["act"],
        residual=res_nhwc,
        residual_relu=res_nhwc is not None,
    )

    def fused() -> torch.Tensor:
        return conv2d(
            x_nhwc,
            c["w_packed"],
            kernel_size=c["k"],
            stride=c["s"],
            padding=c["p"],
            epilogue=epilogue,
            mask=mask,
            out=out,
            workspace=workspace,
        )

    extra = {}
    if provider == "triton_fused":
        extra["rel_err_vs_eager"] = _check(fused().permute(0, 3, 1, 2), y_ref, layer)
        # the first call chose the split (measured, or the heuristic's without autotuning); the graph captures it
        extra["split_k"] = auto_split_k(x_nhwc, c["w_packed"], kernel_size=c["k"], stride=c["s"], padding=c["p"])
        fn = fused
    else:
        fn = functools.partial(eager, provider == "cudnn+epilogue")
    _time_and_record(
        benchmark_or_none, rows, layer=layer, provider=provider, batch=batch, fn=fn, macs=c["macs"], extra=extra
    )


@pytest.mark.parametrize("provider", LINEAR_PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES, ids=[f"b{b}" for b in BATCHES])
@pytest.mark.parametrize("layer", LINEAR_LAYERS)
def test_linear_layer(benchmark_or_none, rows, layer, batch, provider):
    from adaptive_kernels.kernels import Epilogue, linear
    from adaptive_kernels.kernels.linear import linear_auto_split_k, linear_workspace_numel

    tokens, k, n, act, has_res = LINEAR_LAYERS[layer]
    dev = harness.DEVICE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * tokens, k, generator=g).to(dev, DTYPE)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(dev, DTYPE)
    bias = (torch.randn(n, generator=g) * 0.1).to(dev, DTYPE)
    res = torch.randn(batch * tokens, n, generator=g).to(dev, DTYPE) if has_res else None

    def eager(with_epilogue: bool) -> torch.Tensor:
        y = F.linear(x, weight, bias)
        if not with_epilogue:
            return y
        if act == "gelu":
            y = F.gelu(y)
        if res is not None:
            y = res + y
        return y

    out = torch.empty(batch * tokens, n, device=dev, dtype=DTYPE)
    # split-K scratch preallocated, as the engine does: the captured calls time the kernels, not an allocation
    workspace = torch.empty(linear_workspace_numel(batch * tokens, n, k, device=dev), device=dev, dtype=torch.float32)

    epilogue = Epilogue(shift=bias, activation=act, residual=res)

    def fused() -> torch.Tensor:
        return linear(x, weight, epilogue=epilogue, out=out, workspace=workspace)

    extra = {}
    if provider == "triton_fused":
        extra["rel_err_vs_eager"] = _check(fused(), eager(True), layer)
        # the first call chose the split (measured, or the heuristic's without autotuning); the graph captures it
        extra["split_k"] = linear_auto_split_k(x, weight)
        fn = fused
    else:
        fn = functools.partial(eager, provider == "cublas+epilogue")
    _time_and_record(
        benchmark_or_none, rows, layer=layer, provider=provider, batch=batch, fn=fn, macs=tokens * k * n, extra=extra
    )


@pytest.mark.parametrize("provider", ATTENTION_PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES, ids=[f"b{b}" for b in BATCHES])
@pytest.mark.parametrize("layer", ATTENTION_LAYERS)
def test_attention_layer(benchmark_or_none, rows, layer, batch, provider):
    from adaptive_kernels.kernels import attention, attention_ref

    factor, heads, length, d, windows = ATTENTION_LAYERS[layer]
    dev = harness.DEVICE
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch * factor, heads, length, d, generator=g).to(dev, DTYPE) for _ in range(3))
    bias = torch.randn(windows, heads, length, length, generator=g).to(dev, DTYPE) if windows else None
    out = torch.empty_like(q)

    def fn() -> torch.Tensor:
        return attention(q, k, v, bias, backend=provider, out=out)

    err = _check(fn(), attention_ref(q.float(), k.float(), v.float(), None if bias is None else bias.float()), layer)
    _time_and_record(
        benchmark_or_none,
        rows,
        layer=layer,
        provider=provider,
        batch=batch,
        fn=fn,
        macs=factor * heads * 2 * length * length * d,
        extra={"rel_err_vs_fp32": err},
    )
