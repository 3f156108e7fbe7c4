"""BPQ stage 1 in Triton: K and V to per-tile INT8 codes and scales, one pass over each tensor.

Math (kernels/reference.py is the ground truth): k' = (k - mu) / c and q' = q * sm_scale * log2(e) * c,
with mu the per-channel mean of K over the sequence and c = sqrt(amax|k - mu|) / sqrt(amax|q fold|)
per (batch, KV head, channel) ("smooth_k"); then code = trunc(x * 127 / amax_tile +- 1/2) per tile
of rows, scale = amax_tile / 127. Q is quantized the same way inside the attention kernel
(kernels/prefill.py), from the fp16 tile it loads anyway: that saves writing and re-reading Q.

Launches (few, because on short sequences the Python launch cost of each one shows):
  `_channel_stats_kernel`  per chunk of rows: K's per-channel sum / max / min, Q's per-channel max|q|
  `_smoothing_kernel`      per (batch, KV head): reduce the chunks to mu, 1/c and c
  `_quantize_kv_kernel`    per tile of BLOCK_N rows: K codes and V codes (V transposed), scales
Layouts (D padded to a power of two with zero columns, N padded to the tile with zero rows):
  K codes [B, Hkv, Nk_pad, Dp] int8 (rows contiguous along D: the K-major operand of QK^T),
  V codes transposed [B, Hkv, Dp, Nk_pad] int8 (tokens contiguous: the K-major operand of PV,
  DESIGN section 8), scales [B, Hkv, n_tiles] fp32, smoothing vectors [B * Hkv, 3, Dp] fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .reference import LOG2E

STATS_CHUNK = 256  # rows per program of the statistics pass
STATS_SUB = 64  # rows per load inside it (Q: one fp32 running-max tile of this many rows)
STATS_SUB_K = 32  # K: three fp32 running tiles (sum, max, min) of this many rows
QUANT_NUM_WARPS = 4


@triton.jit
def _channel_stats_kernel(Qx, Kx, QPART, KPART, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                          HQ, HKV, n_q_rows, n_k_rows, n_q_programs, n_chunks_q, n_chunks_k,
                          CHUNK: tl.constexpr, SUB: tl.constexpr, SUB_K: tl.constexpr, DP: tl.constexpr,
                          D: tl.constexpr):
    """Program (chunk, head): max|q| per channel of a Q chunk, or sum / max / min per channel of a K chunk.

    Heads 0 .. B*Hq-1 are Q's, the rest K's, so one launch serves both tensors.
    QPART [B*Hq, n_chunks_q, DP]; KPART [B*Hkv, n_chunks_k, 3, DP].
    """
    pid_c = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    if pid_h < n_q_programs:
        if pid_c < n_chunks_q:
            b = pid_h // HQ
            h = pid_h % HQ
            base = Qx + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
            # elementwise running max over the chunk, one cross-thread reduction at the end
            acc_abs = tl.zeros([SUB, DP], dtype=tl.float32)
            for start in range(pid_c * CHUNK, pid_c * CHUNK + CHUNK, SUB):
                offs_n = start + tl.arange(0, SUB)
                mask = (offs_n[:, None] < n_q_rows) & dmask[None, :]
                x = tl.load(base + offs_n[:, None].to(tl.int64) * stride_qn + offs_d[None, :], mask=mask, other=0.0)
                acc_abs = tl.maximum(acc_abs, tl.abs(x.to(tl.float32)))
            tl.store(QPART + (pid_h.to(tl.int64) * n_chunks_q + pid_c) * DP + offs_d, tl.max(acc_abs, axis=0))
    else:
        if pid_c < n_chunks_k:
            kh = pid_h - n_q_programs
            b = kh // HKV
            h = kh % HKV
            base = Kx + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
            # elementwise running sum / max / min over the chunk, reduced across threads once at the end
            acc_sum = tl.zeros([SUB_K, DP], dtype=tl.float32)
            acc_max = tl.full([SUB_K, DP], float("-inf"), dtype=tl.float32)
            acc_min = tl.full([SUB_K, DP], float("inf"), dtype=tl.float32)
            for start in range(pid_c * CHUNK, pid_c * CHUNK + CHUNK, SUB_K):
                offs_n = start + tl.arange(0, SUB_K)
                mask = (offs_n[:, None] < n_k_rows) & dmask[None, :]
                x = tl.load(base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
                acc_sum += x
                acc_max = tl.maximum(acc_max, tl.where(mask, x, float("-inf")))
                acc_min = tl.minimum(acc_min, tl.where(mask, x, float("inf")))
            out = KPART + (kh.to(tl.int64) * n_chunks_k + pid_c) * 3 * DP
            tl.store(out + offs_d, tl.sum(acc_sum, axis=0))
            tl.store(out + DP + offs_d, tl.max(acc_max, axis=0))
            tl.store(out + 2 * DP + offs_d, tl.min(acc_min, axis=0))


@triton.jit
def _smoothing_kernel(QPART, KPART, SMOOTH, GROUP, n_k_rows, n_chunks_q, n_chunks_k, fold,
                      DP: tl.constexpr, D: tl.constexpr, BALANCE: tl.constexpr):
    """Program (batch x KV head): mu, 1/c, c -> SMOOTH[bh, 0..2, :] (1 and 0 in padded channels).

    BALANCE: 2 = c from K and Q ranges, 1 = from K's alone, 0 = c = 1.
    """
    kh = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, DP)
    k_sum = tl.zeros([DP], dtype=tl.float32)
    k_max = tl.full([DP], float("-inf"), dtype=tl.float32)
    k_min = tl.full([DP], float("inf"), dtype=tl.float32)
    for c in range(0, n_chunks_k):
        row = KPART + (kh * n_chunks_k + c) * 3 * DP
        k_sum += tl.load(row + offs_d)
        k_max = tl.maximum(k_max, tl.load(row + DP + offs_d))
        k_min = tl.minimum(k_min, tl.load(row + 2 * DP + offs_d))
    mean = k_sum / n_k_rows
    k_amax = tl.maximum(k_max - mean, mean - k_min)
    if BALANCE == 2:
        q_amax = tl.zeros([DP], dtype=tl.float32)
        for i in range(0, GROUP * n_chunks_q):
            q_amax = tl.maximum(q_amax, tl.load(QPART + (kh * GROUP * n_chunks_q + i) * DP + offs_d))
        q_amax = q_amax * fold
    else:
        q_amax = tl.full([DP], 1.0, dtype=tl.float32)
    ok = (k_amax > 0) & (q_amax > 0) & (offs_d < D)
    c = tl.where(ok, tl.sqrt(tl.maximum(k_amax, 1e-30)) / tl.sqrt(tl.maximum(q_amax, 1e-30)), 1.0)
    if BALANCE == 0:
        c = tl.full([DP], 1.0, dtype=tl.float32)
    mean = tl.where(offs_d < D, mean, 0.0)
    out = SMOOTH + kh * 3 * DP
    tl.store(out + offs_d, mean)
    tl.store(out + DP + offs_d, 1.0 / c)
    tl.store(out + 2 * DP + offs_d, c)


@triton.jit
def _quantize_rows(x, mask):
    """Symmetric INT8 of a masked tile: (codes int8, scale = amax / 127)."""
    x = tl.where(mask, x, 0.0)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    inv = tl.where(amax > 0, 127.0 / amax, 0.0)
    y = x * inv
    codes = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int32)
    codes = tl.minimum(tl.maximum(codes, -127), 127).to(tl.int8)
    return codes, amax / 127.0


@triton.jit
def _quantize_kv_kernel(Kx, Vx, KC, VT, KS, VS, SMOOTH, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, HKV, N, N_PAD, n_tiles,
                        BLOCK: tl.constexpr, DP: tl.constexpr, D: tl.constexpr, SMOOTH_K: tl.constexpr):
    """Program (tile, batch x KV head): K tile -> rows of codes, V tile -> transposed codes, two scales."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_n = pid_t * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, DP)
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    rows = offs_n[:, None].to(tl.int64)
    k = tl.load(Kx + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + rows * stride_kn + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    if SMOOTH_K:
        vec = SMOOTH + pid_bh.to(tl.int64) * 3 * DP
        k = (k - tl.load(vec + offs_d)[None, :]) * tl.load(vec + DP + offs_d)[None, :]
    k_codes, k_scale = _quantize_rows(k, mask)
    out = pid_bh.to(tl.int64) * N_PAD * DP
    tl.store(KC + out + offs_n[:, None] * DP + offs_d[None, :], k_codes)
    tl.store(KS + pid_bh.to(tl.int64) * n_tiles + pid_t, k_scale)
    v = tl.load(Vx + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + rows * stride_vn + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    v_codes, v_scale = _quantize_rows(v, mask)
    tl.store(VT + out + offs_d[None, :] * N_PAD + offs_n[:, None], v_codes)
    tl.store(VS + pid_bh.to(tl.int64) * n_tiles + pid_t, v_scale)


class QuantizedKV(NamedTuple):
    """K and V after BPQ stage 1 (layouts in the module docstring); smooth is None without smoothing."""

    k_codes: torch.Tensor
    k_scales: torch.Tensor
    vt_codes: torch.Tensor
    v_scales: torch.Tensor
    smooth: torch.Tensor | None
    head_dim_padded: int
    n_rows: int  # valid rows (tokens); the code tensors are padded to whole tiles


def padded_head_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def smoothing_vectors(q: torch.Tensor, k: torch.Tensor, fold: float, dp: int, balance: str = "qk") -> torch.Tensor:
    """[B * Hkv, 3, DP] fp32: K's per-channel mean mu, 1/c and c (reference.smooth_k + balance_qk_channels).

    balance "qk" reads Q for its per-channel max; "k" and "none" skip Q entirely.
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    n_chunks_q = triton.cdiv(nq, STATS_CHUNK) if balance == "qk" else 0
    n_chunks_k = triton.cdiv(nk, STATS_CHUNK)
    qpart = torch.empty((b * hq, max(n_chunks_q, 1), dp), device=q.device, dtype=torch.float32)
    n_q_programs = b * hq if balance == "qk" else 0
    kpart = torch.empty((b * hkv, n_chunks_k, 3, dp), device=q.device, dtype=torch.float32)
    _channel_stats_kernel[(max(n_chunks_q, n_chunks_k), n_q_programs + b * hkv)](
        q, k, qpart, kpart, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        hq, hkv, nq, nk, n_q_programs, n_chunks_q, n_chunks_k,
        CHUNK=STATS_CHUNK, SUB=STATS_SUB, SUB_K=STATS_SUB_K, DP=dp, D=d, num_warps=QUANT_NUM_WARPS)
    smooth = torch.empty((b * hkv, 3, dp), device=q.device, dtype=torch.float32)
    _smoothing_kernel[(b * hkv,)](qpart, kpart, smooth, hq // hkv, nk, n_chunks_q, n_chunks_k, float(fold),
                                  DP=dp, D=d, BALANCE=("none", "k", "qk").index(balance), num_warps=QUANT_NUM_WARPS)
    return smooth


def quantize_kv_tiles(q, k, v, block_n: int, sm_scale: float, smooth: bool, balance: str = "qk") -> QuantizedKV:
    """BPQ stage 1 of k and v (validated by the caller) into the attention kernel's layouts.

    q is read only for the smoothing statistics (when `smooth`); the attention kernel quantizes
    Q itself with the returned smoothing vectors.
    """
    b, hkv, nk, d = k.shape
    dp = padded_head_dim(d)
    vectors = smoothing_vectors(q, k, sm_scale * LOG2E, dp, balance) if smooth else None
    n_tiles = triton.cdiv(nk, block_n)
    n_pad = n_tiles * block_n
    k_codes = torch.empty((b, hkv, n_pad, dp), device=k.device, dtype=torch.int8)
    vt_codes = torch.empty((b, hkv, dp, n_pad), device=k.device, dtype=torch.int8)
    k_scales = torch.empty((b, hkv, n_tiles), device=k.device, dtype=torch.float32)
    v_scales = torch.empty((b, hkv, n_tiles), device=k.device, dtype=torch.float32)
    _quantize_kv_kernel[(n_tiles, b * hkv)](
        k, v, k_codes, vt_codes, k_scales, v_scales, vectors if vectors is not None else k_scales,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), hkv, nk, n_pad, n_tiles,
        BLOCK=block_n, DP=dp, D=d, SMOOTH_K=smooth, num_warps=QUANT_NUM_WARPS)
    return QuantizedKV(k_codes, k_scales, vt_codes, v_scales, vectors, dp, nk)
