"""Multi-head attention for ViT/Swin: ``softmax(q @ k^T * scale + bias) @ v``.

Two backends, both capturable in a CUDA graph (no host sync, no data-dependent allocation):

* ``"sdpa"`` (default): torch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels).
* ``"triton"``: our flash-attention-style kernel (online softmax, fp32 statistics), which also supports
  early exit on a mask bit and Swin's per-window bias without materialising it per batch.

Which is faster was NOT measured on a GPU yet (no GPU in the session that wrote this), so SDPA stays the
default and the Triton kernel is opt-in (``backend="triton"``).

Additive bias layouts: ``(H, Lq, Lk)`` (one bias per head, e.g. Swin's relative-position bias) or
``(nb, hb, Lq, Lk)`` with ``hb`` in {1, H} and ``nb`` dividing the batch: batch entry ``b`` uses
``bias[b % nb]`` — Swin's shifted-window mask (``nW`` windows, inner in the ``B*nW`` batch) as
``(nW, 1, L, L)``, or combined with the relative-position bias as ``(nW, H, L, L)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common
from ._common import dot_precision

_BACKENDS = ("sdpa", "triton")


def _configs() -> list[triton.Config]:
    shapes = [  # BM, BN, warps, stages; the first is the default
        (64, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 32, 4, 3),
        (64, 32, 4, 3),
        (128, 128, 8, 2),
        (64, 128, 4, 2),
        (32, 32, 4, 2),
        (16, 64, 4, 2),
    ]
    tuned = [triton.Config({"BM": m, "BN": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]
    return _common.choose_configs(triton.Config({"BM": 16, "BN": 16}, num_warps=4, num_stages=1), tuned)


def _prune_configs(configs, nargs, **kwargs):
    return _common.prune_tiles(configs, BM=nargs["LQ"], BN=nargs["LK"])


@triton.autotune(
    configs=_configs(),
    key=["LQ", "LK", "HEAD_DIM", "B_H"],
    prune_configs_by={"early_config_prune": _prune_configs},
    restore_value=["out_ptr"],
    cache_results=True,
)
@triton.jit
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    bias_ptr,
    mask_ptr,
    exit_index,
    B_H,
    H,
    LQ,
    LK,
    NB,
    sqb,
    sqh,
    sql,
    skb,
    skh,
    skl,
    svb,
    svh,
    svl,
    sob,
    soh,
    sol,
    sbb,
    sbh,
    sbl,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_EXIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """out[b, h, i] = sum_j softmax_j(q[b, h, i] . k[b, h, j] * scale + bias[b % NB, h, i, j]) v[b, h, j].
    qk_scale = scale * log2(e): the softmax runs in base 2. Unit stride along the head dim everywhere."""
    LOG2E: tl.constexpr = 1.4426950408889634
    if HAS_EXIT:  # noqa: SIM102 (a constexpr guard; `and` would emit the load)
        if tl.load(mask_ptr + exit_index) == 0:
            return
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, BLOCK_D)
    m_ok = rm < LQ
    d_ok = rd < HEAD_DIM
    q = tl.load(
        q_ptr + b * sqb + h * sqh + rm[:, None] * sql + rd[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0
    )
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    bias_base = bias_ptr + (b % NB) * sbb + h * sbh
    # A finite start for the running max: rows whose first blocks are all -inf then give exp2(-inf) = 0, not NaN.
    m_i = tl.full((BM,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, LK, BN):
        rn = n0 + tl.arange(0, BN)
        n_ok = rn < LK
        kt = tl.load(k_base + rn[None, :] * skl + rd[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_base + rm[:, None] * sbl + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            s += bias.to(tl.float32) * LOG2E
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + rn[:, None] * svl + rd[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(
        out_ptr + b * sob + h * soh + rm[:, None] * sol + rd[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )


def _bias_4d(op: str, attn_bias: torch.Tensor, q: torch.Tensor, lk: int) -> torch.Tensor:
    """Validate attn_bias against q: (B, H, Lq, D) and return it as (nb, hb, Lq, Lk)."""
    bsz, heads, lq, _ = q.shape
    _common.check_float(op, "attn_bias", attn_bias, (q.dtype,))
    if attn_bias.dim() == 3:
        if attn_bias.shape[0] != heads:
            raise ValueError(
                f"{op}: a 3-D attn_bias is per head, (H={heads}, Lq, Lk), got {tuple(attn_bias.shape)}: for a bias per "
                f"batch entry or window, (nb, Lq, Lk), pass attn_bias[:, None] (shape (nb, 1, Lq, Lk))"
            )
        attn_bias = attn_bias[None]
    if attn_bias.dim() != 4:
        raise ValueError(f"{op}: attn_bias must be (H, Lq, Lk) or (nb, hb, Lq, Lk), got {tuple(attn_bias.shape)}")
    nb, hb, bl, bk = attn_bias.shape
    if (bl, bk) != (lq, lk) or hb not in (1, heads) or nb < 1 or bsz % nb != 0:
        raise ValueError(
            f"{op}: attn_bias of shape {tuple(attn_bias.shape)} does not fit q (B={bsz}, H={heads}, Lq={lq}) and "
            f"Lk={lk}: expected (nb, 1 or {heads}, {lq}, {lk}) with nb dividing {bsz} (batch b uses bias[b % nb])"
        )
    if attn_bias.stride(-1) != 1:
        raise ValueError(f"{op}: attn_bias needs unit stride along its last dim: pass attn_bias.contiguous()")
    return attn_bias


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_bias: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str = "sdpa",
    mask: torch.Tensor | None = None,
    exit_index: int = -1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention: q: (B, H, Lq, D), k and v: (B, H, Lk, D), all one dtype (fp16/bf16/fp32), any strides with
    unit stride along D. attn_bias: see the module doc, q's dtype. scale: default 1/sqrt(D).
    Returns (B, H, Lq, D) in q's dtype (``out`` when given, any strides with unit stride along D).
    backend: "sdpa" (default) or "triton". ``exit_index >= 0`` (Triton backend only): ``mask[exit_index] == 0``
    returns at once and ``out`` (required) keeps its content.
    """
    op = "attention"
    if backend not in _BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {', '.join(map(repr, _BACKENDS))}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _common.check_float(op, name, t, (q.dtype,) if name != "q" else _common.FLOAT_DTYPES)
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, heads, L, head_dim), got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} needs unit stride along head_dim: pass {name}.contiguous()")
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    if k.shape != (bsz, heads, lk, d) or v.shape != k.shape:
        raise ValueError(
            f"{op}: k and v must be (B={bsz}, H={heads}, Lk, D={d}) and equal, got k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if lk == 0:
        raise ValueError(f"{op}: k and v have no keys (Lk = 0)")
    if attn_bias is not None:
        attn_bias = _bias_4d(op, attn_bias, q, lk)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    _common.check_mask(op, mask, exit_index=exit_index)
    if exit_index >= 0 and backend != "triton":
        raise ValueError(
            f"{op}: exit_index needs backend='triton' (SDPA cannot read the mask and exit early); or "
            f"run the SDPA attention unconditionally (its result is only read by kernels that exit)"
        )
    _common.check_exit_out(op, exit_index, out)
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
            raise ValueError(
                f"{op}: out must be {tuple(q.shape)} {q.dtype} with unit stride along head_dim, got "
                f"{tuple(out.shape)} {out.dtype} strides {out.stride()}"
            )
        if any(_common.overlaps(out, t) for t in (q, k, v)):
            raise ValueError(f"{op}: out overlaps q, k or v: use another output buffer")
    if backend == "sdpa":
        _common.check_device(op, "attention_ref", q=q, k=k, v=v, attn_bias=attn_bias, out=out)
        y = _sdpa(q, k, v, attn_bias, scale)
        return out.copy_(y) if out is not None else y

    _common.check_device(op, "attention_ref", q=q, k=k, v=v, attn_bias=attn_bias, mask=mask, out=out)
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if bsz * heads * lq == 0:
        return out
    block_d = max(16, _common.next_pow2(d))  # tl.dot needs >= 16 along each dim
    if attn_bias is not None:
        bias, nb, sbb, sbh, sbl = (
            attn_bias,
            attn_bias.shape[0],
            attn_bias.stride(0),
            attn_bias.stride(1),
            attn_bias.stride(2),
        )
        if attn_bias.shape[1] == 1:
            sbh = 0
    else:
        bias, nb, sbb, sbh, sbl = out, 1, 0, 0, 0

    def grid(meta):
        return triton.cdiv(lq, meta["BM"]), bsz * heads

    _attention_kernel[grid](
        q,
        k,
        v,
        out,
        bias,
        mask if mask is not None else out,
        max(exit_index, 0),
        bsz * heads,
        heads,
        lq,
        lk,
        nb,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        sbb,
        sbh,
        sbl,
        float(scale) * math.log2(math.e),
        HEAD_DIM=d,
        BLOCK_D=block_d,
        HAS_BIAS=attn_bias is not None,
        HAS_EXIT=exit_index >= 0,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    if bias is None or bias.shape[0] in (1, q.shape[0]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    # bias[b % nb]: fold the batch as (B/nb outer, nb inner) and treat (nb, H) as the head dim, so the bias
    # broadcasts over the outer batch; copies q/k/v only when their strides cannot be merged that way.
    bsz, heads, lq, d = q.shape
    nb = bias.shape[0]

    def fold(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(bsz // nb, nb * heads, t.shape[2], d)

    bias = bias.expand(nb, heads, lq, k.shape[2]).reshape(1, nb * heads, lq, k.shape[2])
    y = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), attn_mask=bias, scale=scale)
    return y.reshape(bsz, heads, lq, d)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_bias: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str = "sdpa",
    mask: torch.Tensor | None = None,
    exit_index: int = -1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch reference of :func:`attention` (same arguments; ``backend`` is ignored): explicit
    matmul / softmax / matmul in q's dtype (float64 in, exact out). Reads the mask with ``.item()``."""
    if exit_index >= 0 and int(mask[exit_index].item()) == 0:
        _common.check_exit_out("attention_ref", exit_index, out)
        return out
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if attn_bias is not None:
        bias = attn_bias[None] if attn_bias.dim() == 3 else attn_bias
        s = s + bias[torch.arange(q.shape[0], device=bias.device) % bias.shape[0]].to(q.dtype)
    y = torch.softmax(s, dim=-1) @ v
    if out is not None:
        return out.copy_(y)
    return y
