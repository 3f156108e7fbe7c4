"""BPQ stage 1 in Triton: Q, K, V to per-tile INT8 codes and scales, one pass over each tensor.

Math (kernels/reference.py is the ground truth): q' = q * sm_scale * log2(e) * c, k' = (k - mu) / c,
with mu the per-channel mean of K over the sequence and c = sqrt(amax|k - mu|) / sqrt(amax|q fold|)
per (batch, KV head, channel) ("smooth_k"); then code = trunc(x * 127 / amax_tile +- 1/2) per tile
of block rows, scale = amax_tile / 127.

Layouts written (D padded to a power of two with zero columns, N padded to the tile with zero rows):
  Q codes [B, Hq, Nq_pad, Dp] int8, K codes [B, Hkv, Nk_pad, Dp] int8 (rows contiguous along D,
  the K-major operand of QK^T), V codes transposed [B, Hkv, Dp, Nk_pad] int8 (tokens contiguous,
  the K-major operand of PV: DESIGN section 8), scales [B, H, n_tiles] fp32.
Kernels: `_channel_stats_kernel` (partial per-channel sum / max / min / amax over row chunks) and
`_quantize_tiles_kernel` (one program per tile).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .reference import LOG2E

STATS_CHUNK = 256  # rows per program of the statistics pass
QUANT_NUM_WARPS = 4


@triton.jit
def _channel_stats_kernel(X, PART, stride_xb, stride_xh, stride_xn, H, N, n_chunks,
                          CHUNK: tl.constexpr, DP: tl.constexpr, D: tl.constexpr, SUB: tl.constexpr):
    """Per (b, h, chunk of CHUNK rows): sum, max, min and max|x| of each channel -> PART[bh, chunk, 4, DP]."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    acc_sum = tl.zeros([DP], dtype=tl.float32)
    acc_max = tl.full([DP], float("-inf"), dtype=tl.float32)
    acc_min = tl.full([DP], float("inf"), dtype=tl.float32)
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    for start in range(pid_c * CHUNK, pid_c * CHUNK + CHUNK, SUB):
        offs_n = start + tl.arange(0, SUB)
        mask = (offs_n[:, None] < N) & dmask[None, :]
        x = tl.load(base + offs_n[:, None].to(tl.int64) * stride_xn + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc_sum += tl.sum(x, axis=0)
        acc_max = tl.maximum(acc_max, tl.max(tl.where(mask, x, float("-inf")), axis=0))
        acc_min = tl.minimum(acc_min, tl.min(tl.where(mask, x, float("inf")), axis=0))
    out = PART + (pid_bh.to(tl.int64) * n_chunks + pid_c) * 3 * DP
    tl.store(out + offs_d, acc_sum)
    tl.store(out + DP + offs_d, acc_max)
    tl.store(out + 2 * DP + offs_d, acc_min)


@triton.jit
def _quantize_tiles_kernel(X, OUT, SCALES, SHIFT, MULT, stride_xb, stride_xh, stride_xn,
                           H, N, N_PAD, n_tiles, mult_scalar,
                           BLOCK: tl.constexpr, DP: tl.constexpr, D: tl.constexpr,
                           HAS_SHIFT: tl.constexpr, HAS_MULT: tl.constexpr, TRANSPOSE: tl.constexpr):
    """One tile of BLOCK rows: x' = (x - SHIFT[c]) * MULT[c] * mult_scalar, symmetric INT8 over the tile.

    SHIFT/MULT are per (b, h) channel vectors of length DP (zero/one in the padding). TRANSPOSE
    writes the tile as [DP, BLOCK]
    into OUT[b, h, :, tile] (tokens contiguous), else [BLOCK, DP] rows.
    """
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_t * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, DP)
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    x = tl.load(base + offs_n[:, None].to(tl.int64) * stride_xn + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    vec = pid_bh.to(tl.int64) * DP + offs_d
    if HAS_SHIFT:
        x = x - tl.load(SHIFT + vec)[None, :]
    if HAS_MULT:
        x = x * tl.load(MULT + vec)[None, :]
    x = x * mult_scalar
    x = tl.where(mask, x, 0.0)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    inv = tl.where(amax > 0, 127.0 / amax, 0.0)
    y = x * inv
    codes = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int32)
    codes = tl.minimum(tl.maximum(codes, -127), 127).to(tl.int8)
    out_base = OUT + pid_bh.to(tl.int64) * N_PAD * DP
    if TRANSPOSE:
        tl.store(out_base + offs_d[None, :].to(tl.int64) * N_PAD + offs_n[:, None], codes)
    else:
        tl.store(out_base + offs_n[:, None].to(tl.int64) * DP + offs_d[None, :], codes)
    tl.store(SCALES + pid_bh.to(tl.int64) * n_tiles + pid_t, amax / 127.0)


class QuantizedTiles(NamedTuple):
    """Output of `quantize_qkv_tiles` (layouts in the module docstring)."""

    q_codes: torch.Tensor
    q_scales: torch.Tensor
    k_codes: torch.Tensor
    k_scales: torch.Tensor
    vt_codes: torch.Tensor
    v_scales: torch.Tensor
    head_dim_padded: int


def padded_head_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _channel_stats(x: torch.Tensor, dp: int) -> torch.Tensor:
    """[B, H, N, D] -> per-chunk partial (sum, max, min) [B*H, n_chunks, 3, DP] via the Triton kernel."""
    b, h, n, d = x.shape
    n_chunks = triton.cdiv(n, STATS_CHUNK)
    part = torch.empty((b * h, n_chunks, 3, dp), device=x.device, dtype=torch.float32)
    sub = min(64, STATS_CHUNK)
    _channel_stats_kernel[(n_chunks, b * h)](
        x, part, x.stride(0), x.stride(1), x.stride(2), h, n, n_chunks,
        CHUNK=STATS_CHUNK, DP=dp, D=d, SUB=sub, num_warps=QUANT_NUM_WARPS)
    return part


def smoothing_vectors(q: torch.Tensor, k: torch.Tensor, fold: float, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K's per-channel mean mu and the Q/K balance factor c, both [B * Hkv, DP] fp32 (c = 1 in padding).

    Matches reference.smooth_k + reference.balance_qk_channels on q * fold.
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    kp = _channel_stats(k, dp)
    mean = kp[:, :, 0].sum(dim=1) / nk
    k_amax = torch.maximum(kp[:, :, 1].amax(dim=1) - mean, mean - kp[:, :, 2].amin(dim=1))
    qp = _channel_stats(q, dp)
    q_amax = torch.maximum(qp[:, :, 1].amax(dim=1), -qp[:, :, 2].amin(dim=1)) * fold
    q_amax = q_amax.view(b, hkv, group, dp).amax(dim=2).reshape(b * hkv, dp)
    tiny = torch.finfo(torch.float32).tiny
    c = torch.sqrt(k_amax.clamp_min(tiny)) / torch.sqrt(q_amax.clamp_min(tiny))
    c = torch.where((k_amax > 0) & (q_amax > 0), c, torch.ones_like(c))
    return mean.contiguous(), c.contiguous()


def _quantize(x, block, dp, shift=None, mult=None, mult_scalar=1.0, transpose=False):
    b, h, n, d = x.shape
    n_tiles = triton.cdiv(n, block)
    n_pad = n_tiles * block
    shape = (b, h, dp, n_pad) if transpose else (b, h, n_pad, dp)
    out = torch.empty(shape, device=x.device, dtype=torch.int8)
    scales = torch.empty((b, h, n_tiles), device=x.device, dtype=torch.float32)
    dummy = scales
    _quantize_tiles_kernel[(n_tiles, b * h)](
        x, out, scales, shift if shift is not None else dummy, mult if mult is not None else dummy,
        x.stride(0), x.stride(1), x.stride(2), h, n, n_pad, n_tiles, float(mult_scalar),
        BLOCK=block, DP=dp, D=d, HAS_SHIFT=shift is not None, HAS_MULT=mult is not None,
        TRANSPOSE=transpose, num_warps=QUANT_NUM_WARPS)
    return out, scales


def quantize_qkv_tiles(q, k, v, block_m: int, block_n: int, sm_scale: float, smooth: bool) -> QuantizedTiles:
    """BPQ stage 1 of q, k, v (validated by the caller) into the attention kernel's layouts."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    dp = padded_head_dim(d)
    fold = sm_scale * LOG2E
    if smooth:
        mean, c = smoothing_vectors(q, k, fold, dp)
        # one balance vector per query head (its KV head's), so the kernel indexes by (b, h)
        c_q = c.view(b, hkv, 1, dp).expand(-1, -1, hq // hkv, -1).reshape(b * hq, dp).contiguous()
        q_codes, q_scales = _quantize(q, block_m, dp, mult=c_q, mult_scalar=fold)
        k_codes, k_scales = _quantize(k, block_n, dp, shift=mean, mult=1.0 / c)
    else:
        q_codes, q_scales = _quantize(q, block_m, dp, mult_scalar=fold)
        k_codes, k_scales = _quantize(k, block_n, dp)
    vt_codes, v_scales = _quantize(v, block_n, dp, transpose=True)
    return QuantizedTiles(q_codes, q_scales, k_codes, k_scales, vt_codes, v_scales, dp)
