"""BPQ stage 1 in Triton: K and V to per-tile INT8 codes and scales, one pass over each tensor.

Math (kernels/reference.py is the ground truth): k' = (k - mu) / c and q' = q * sm_scale * log2(e) * c,
with mu the per-channel mean of K over the sequence and c = sqrt(amax|k - mu|) / sqrt(amax|q fold|)
per (batch, KV head, channel) ("smooth_k"); then code = trunc(x * 127 / amax_tile +- 1/2) per tile
of rows, scale = amax_tile / 127. Q is quantized the same way inside the attention kernel
(kernels/prefill.py), from the fp16 tile it loads anyway: that saves writing and re-reading Q.

Launches (few, because on short sequences the Python launch cost of each one shows):
  `_channel_stats_kernel`  per chunk of rows: K's per-channel sum / max / min, Q's per-channel max|q|
                           (and, for a KV cache's head priorities, V's too, with sums of squares)
  `_smoothing_kernel`      per (batch, KV head): reduce the chunks to mu, 1/c and c
  `_quantize_kv_kernel`    per tile of BLOCK_N rows: K codes and V codes (V transposed), scales;
                           with a TurboKVCache, also its packed 4/2-bit blocks and residual buffer
                           (the packed-cache by-product of the prefill: K and V are read once)
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

from .decode import QUANT_NUM_WARPS as CACHE_QUANT_NUM_WARPS
from .decode import _buffer_rows, _pool_block
from .reference import LOG2E
from .sas import E4M3_MAX, to_e4m3

STATS_CHUNK = 256  # rows per program of the statistics pass
STATS_SUB = 64  # rows per load inside it (Q: one fp32 running-max tile of this many rows)
STATS_SUB_K = 32  # K: three fp32 running tiles (sum, max, min) of this many rows
QUANT_NUM_WARPS = 4
MOMENT_CHUNKS = 8  # statistics chunks reduced per step of the moments kernel


@triton.jit
def _row_stats(base, stride_n, lo, n_rows, out, CHUNK: tl.constexpr, SUB: tl.constexpr, DP: tl.constexpr,
               D: tl.constexpr, SUMSQ: tl.constexpr):
    """Per-channel sum, max, min (and sum of squares) of rows [lo, min(lo + CHUNK, n_rows)) -> out[0..3, :]."""
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    # elementwise running sum / max / min over the chunk, reduced across threads once at the end
    acc_sum = tl.zeros([SUB, DP], dtype=tl.float32)
    acc_sq = tl.zeros([SUB, DP], dtype=tl.float32)
    acc_max = tl.full([SUB, DP], float("-inf"), dtype=tl.float32)
    acc_min = tl.full([SUB, DP], float("inf"), dtype=tl.float32)
    for start in range(lo, lo + CHUNK, SUB):
        offs_n = start + tl.arange(0, SUB)
        mask = (offs_n[:, None] < n_rows) & dmask[None, :]
        x = tl.load(base + offs_n[:, None].to(tl.int64) * stride_n + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc_sum += x
        if SUMSQ:
            acc_sq += x * x
        acc_max = tl.maximum(acc_max, tl.where(mask, x, float("-inf")))
        acc_min = tl.minimum(acc_min, tl.where(mask, x, float("inf")))
    tl.store(out + offs_d, tl.sum(acc_sum, axis=0))
    tl.store(out + DP + offs_d, tl.max(acc_max, axis=0))
    tl.store(out + 2 * DP + offs_d, tl.min(acc_min, axis=0))
    if SUMSQ:
        tl.store(out + 3 * DP + offs_d, tl.sum(acc_sq, axis=0))


@triton.jit
def _channel_stats_kernel(Qx, Kx, Vx, QPART, KPART, VPART, LEN, stride_qb, stride_qh, stride_qn,
                          stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                          HQ, HKV, n_q_rows, n_k_rows, n_q_programs, n_k_programs, n_chunks_q, n_chunks_k,
                          CHUNK: tl.constexpr, SUB: tl.constexpr, SUB_K: tl.constexpr, DP: tl.constexpr,
                          D: tl.constexpr, NSTAT: tl.constexpr, HAS_LEN: tl.constexpr):
    """Program (chunk, head): max|q| per channel of a Q chunk, or per-channel statistics of a K or V chunk.

    Heads 0 .. n_q_programs-1 are Q's, the next B*Hkv K's, the next B*Hkv (if launched) V's, so one
    launch serves every tensor. QPART [B*Hq, n_chunks_q, DP]; KPART, VPART [B*Hkv, n_chunks_k, NSTAT, DP]
    with rows sum, max, min and (NSTAT = 4) sum of squares. HAS_LEN: sequence b's K and V rows stop
    at min(n_k_rows, LEN[b]).
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
            is_v = kh >= n_k_programs
            if is_v:
                kh = kh - n_k_programs
            b = kh // HKV
            h = kh % HKV
            n_rows = n_k_rows
            if HAS_LEN:
                n_rows = tl.minimum(n_rows, tl.load(LEN + b))
            row = (kh.to(tl.int64) * n_chunks_k + pid_c) * NSTAT * DP
            if is_v:
                base = Vx + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
                _row_stats(base, stride_vn, pid_c * CHUNK, n_rows, VPART + row, CHUNK, SUB_K, DP, D, NSTAT == 4)
            else:
                base = Kx + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
                _row_stats(base, stride_kn, pid_c * CHUNK, n_rows, KPART + row, CHUNK, SUB_K, DP, D, NSTAT == 4)


@triton.jit
def _head_moments_kernel(KPART, VPART, LEN, MEAN, MOM, H, n_chunks, DP: tl.constexpr, D: tl.constexpr,
                         NSTAT: tl.constexpr, CH: tl.constexpr, WRITE_MEAN: tl.constexpr, PRIORITY: tl.constexpr):
    """Program (b, h): reduce the statistics pass's chunks of sequence b, KV head h (float64).

    WRITE_MEAN: MEAN[b, h, :D] = K's per-channel mean over LEN[b] rows (0 if none), fp32.
    PRIORITY (NSTAT = 4): MOM[b, h] = for K (minus that mean when WRITE_MEAN) then V: the largest and
    smallest value, and over the channels (n = LEN[b], channel mean c) the sum of the second
    moments about c, sum n c and sum n c^2 (`_assign_bits_kernel` combines the sequences).
    """
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, DP)
    offs_c = tl.arange(0, CH)
    dmask = offs_d < D
    n_rows = tl.load(LEN + pid_b)
    n = n_rows.to(tl.float64)
    row0 = (pid_b * H + h).to(tl.int64) * n_chunks * NSTAT * DP
    for t in tl.static_range(2 if PRIORITY else 1):
        PART = KPART if t == 0 else VPART
        total = tl.zeros([CH, DP], dtype=tl.float64)
        sq = tl.zeros([CH, DP], dtype=tl.float64)
        mx = tl.full([CH, DP], float("-inf"), dtype=tl.float32)
        mn = tl.full([CH, DP], float("inf"), dtype=tl.float32)
        for c0 in range(0, n_chunks, CH):
            cmask = (c0 + offs_c)[:, None] < n_chunks
            ptrs = PART + row0 + (c0 + offs_c)[:, None] * (NSTAT * DP) + offs_d[None, :]
            total += tl.load(ptrs, mask=cmask, other=0.0).to(tl.float64)
            if PRIORITY:
                mx = tl.maximum(mx, tl.load(ptrs + DP, mask=cmask, other=float("-inf")))
                mn = tl.minimum(mn, tl.load(ptrs + 2 * DP, mask=cmask, other=float("inf")))
                sq += tl.load(ptrs + 3 * DP, mask=cmask, other=0.0).to(tl.float64)
        mean = tl.sum(total, axis=0) / tl.maximum(n, 1.0)
        if t == 0 and WRITE_MEAN:
            tl.store(MEAN + (pid_b * H + h).to(tl.int64) * D + offs_d, mean.to(tl.float32), mask=dmask)
        if PRIORITY:
            shift = mean if (t == 0 and WRITE_MEAN) else tl.zeros([DP], dtype=tl.float64)
            ok = dmask & (tl.zeros([DP], dtype=tl.int32) + n_rows > 0)
            hi = tl.where(ok, tl.max(mx, axis=0).to(tl.float64) - shift, float("-inf"))
            lo = tl.where(ok, tl.min(mn, axis=0).to(tl.float64) - shift, float("inf"))
            m2 = tl.where(ok, tl.maximum(tl.sum(sq, axis=0) - n * mean * mean, 0.0), 0.0)
            centred = tl.where(ok, mean - shift, 0.0)
            out = MOM + ((pid_b * H + h) * 2 + t) * 5
            tl.store(out, tl.max(hi, axis=0))
            tl.store(out + 1, tl.min(lo, axis=0))
            tl.store(out + 2, tl.sum(m2, axis=0))
            tl.store(out + 3, tl.sum(n * centred, axis=0))
            tl.store(out + 4, tl.sum(n * centred * centred, axis=0))


@triton.jit
def _assign_bits_kernel(MOM, PRIO, BITS, SLOT, B, H, n_low, count, HP: tl.constexpr):
    """One program: head priorities from `_head_moments_kernel`'s moments, then the bit assignment.

    Over the B sequences: gap = max - min of the values, std^2 = (sum m2 + sum n c^2 - (sum n c)^2 /
    count) / count; priority = sum over (K, V) of p / mean_h(p) with p = gap x std
    (reference.kv_head_priority); the n_low heads of lowest fp32 priority (ties: lower index first,
    as a stable sort) get 2 bits, the rest 4; a head's slot is its index among the heads of its
    width (reference.head_slots). PRIO [H] fp32, BITS, SLOT [H] int32.
    """
    offs = tl.arange(0, HP)
    hm = offs < H
    total = tl.zeros([HP], dtype=tl.float64)
    for t in tl.static_range(2):
        hi = tl.full([HP], float("-inf"), dtype=tl.float64)
        lo = tl.full([HP], float("inf"), dtype=tl.float64)
        m2 = tl.zeros([HP], dtype=tl.float64)
        s1 = tl.zeros([HP], dtype=tl.float64)
        s2 = tl.zeros([HP], dtype=tl.float64)
        for b in range(0, B):
            base = MOM + ((b * H + offs) * 2 + t) * 5
            hi = tl.maximum(hi, tl.load(base, mask=hm, other=float("-inf")))
            lo = tl.minimum(lo, tl.load(base + 1, mask=hm, other=float("inf")))
            m2 += tl.load(base + 2, mask=hm, other=0.0)
            s1 += tl.load(base + 3, mask=hm, other=0.0)
            s2 += tl.load(base + 4, mask=hm, other=0.0)
        gap = tl.where(hi > float("-inf"), hi - lo, 0.0)  # 0: the head holds no value
        var = tl.maximum((m2 + s2 - s1 * s1 / count) / count, 0.0)
        pr = tl.where(hm, gap * tl.sqrt(var), 0.0)
        mean = tl.sum(pr, axis=0) / H
        total += tl.where(mean > 0, pr / tl.where(mean > 0, mean, 1.0), pr)
    prio = total.to(tl.float32)
    tl.store(PRIO + offs, prio, mask=hm)
    p_i = prio[:, None]
    p_j = prio[None, :]
    earlier = offs[None, :] < offs[:, None]
    before = ((p_j < p_i) | ((p_j == p_i) & earlier)) & hm[None, :]
    rank = tl.sum(before.to(tl.int32), axis=1)
    bits = tl.where(rank < n_low, 2, 4)
    same = (bits[None, :] == bits[:, None]) & earlier & hm[None, :]
    slot = tl.sum(same.to(tl.int32), axis=1)
    tl.store(BITS + offs, bits, mask=hm)
    tl.store(SLOT + offs, slot, mask=hm)


@triton.jit
def _smoothing_kernel(QPART, KPART, SMOOTH, GROUP, n_k_rows, n_chunks_q, n_chunks_k, fold,
                      DP: tl.constexpr, D: tl.constexpr, BALANCE: tl.constexpr, NSTAT: tl.constexpr):
    """Program (batch x KV head): mu, 1/c, c -> SMOOTH[bh, 0..2, :] (1 and 0 in padded channels).

    BALANCE: 2 = c from K and Q ranges, 1 = from K's alone, 0 = c = 1.
    """
    kh = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, DP)
    k_sum = tl.zeros([DP], dtype=tl.float32)
    k_max = tl.full([DP], float("-inf"), dtype=tl.float32)
    k_min = tl.full([DP], float("inf"), dtype=tl.float32)
    for c in range(0, n_chunks_k):
        row = KPART + (kh * n_chunks_k + c) * NSTAT * DP
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
def _quantize_rows(x, mask, FP8: tl.constexpr, FAST: tl.constexpr):
    """Symmetric 8-bit codes of a masked tile and its scale: INT8 (round half away from zero),
    scale amax / 127; FP8: e4m3 (round to nearest even; FAST: the GPU's conversion), scale
    amax / 448, or 1 for a tile of zeros."""
    x = tl.where(mask, x, 0.0)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    if FP8:
        inv = tl.where(amax > 0, E4M3_MAX / amax, 0.0)
        codes = to_e4m3(tl.minimum(tl.maximum(x * inv, -E4M3_MAX), E4M3_MAX), FAST)
        return codes, tl.where(amax > 0, amax / E4M3_MAX, 1.0)
    else:
        inv = tl.where(amax > 0, 127.0 / amax, 0.0)
        y = x * inv
        codes = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int32)
        codes = tl.minimum(tl.maximum(codes, -127), 127).to(tl.int8)
        return codes, amax / 127.0


@triton.jit
def _quantize_kv_kernel(Kx, Vx, KC, VT, KS, VS, SMOOTH, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, HKV, N, N_PAD, n_tiles,
                        C_LEN, C_MEAN, C_BITS, C_SLOT, KC4, KSC4, KZ4, VC4, VSC4, VZ4, KC2, KSC2, KZ2, VC2, VSC2, VZ2,
                        C_KS1, C_VS1, C_KBUF, C_VBUF, C_H4, C_H2, C_NBLK,
                        BLOCK: tl.constexpr, DP: tl.constexpr, D: tl.constexpr, SMOOTH_K: tl.constexpr,
                        CACHE: tl.constexpr, C_NB: tl.constexpr, C_NBP: tl.constexpr, C_VG: tl.constexpr,
                        C_NG: tl.constexpr, C_HAS_MEAN: tl.constexpr, V_FP8: tl.constexpr, FAST: tl.constexpr):
    """Program (tile, batch x KV head): K tile -> rows of codes, V tile -> transposed codes, two scales.

    V_FP8: V's codes are float8 e4m3 (compute_format "fp8_pv"); FAST: the GPU's fp8 conversion.

    CACHE: programs n_tiles + 2 j (K) and n_tiles + 2 j + 1 (V) store block j of the prompt into a
    TurboKVCache (kernels/decode.py's format): a whole block of C_NB tokens goes to the head's 4- or
    2-bit pool (K minus the cache's own smoothing mean), a partial last block to the residual buffer. They run right after the
    head's INT8 tiles (the grid's first axis varies fastest), which have just brought the same rows
    into L2, so K and V are read from memory about once. (Doing both in one program spilled.)
    """
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    k_head = Kx + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_head = Vx + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    if pid_t < n_tiles:
        offs_n = pid_t * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, DP)
        mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
        rows = offs_n[:, None].to(tl.int64)
        k = tl.load(k_head + rows * stride_kn + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        if SMOOTH_K:
            vec = SMOOTH + pid_bh.to(tl.int64) * 3 * DP
            k = (k - tl.load(vec + offs_d)[None, :]) * tl.load(vec + DP + offs_d)[None, :]
        k_codes, k_scale = _quantize_rows(k, mask, False, FAST)
        out = pid_bh.to(tl.int64) * N_PAD * DP
        tl.store(KC + out + offs_n[:, None] * DP + offs_d[None, :], k_codes)
        tl.store(KS + pid_bh.to(tl.int64) * n_tiles + pid_t, k_scale)
        v = tl.load(v_head + rows * stride_vn + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        v_codes, v_scale = _quantize_rows(v, mask, V_FP8, FAST)
        tl.store(VT + out + offs_d[None, :] * N_PAD + offs_n[:, None], v_codes)
        tl.store(VS + pid_bh.to(tl.int64) * n_tiles + pid_t, v_scale)
    if CACHE:
        if pid_t >= n_tiles:
            j = pid_t - n_tiles
            blk = j // 2
            start = blk.to(tl.int64) * C_NB
            src_k = k_head + start * stride_kn
            src_v = v_head + start * stride_vn
            if start + C_NB <= N:
                if j % 2 == 0:
                    _pool_block(src_k, stride_kn, blk, b, h, pid_bh, C_MEAN, C_BITS, C_SLOT, KC4, KSC4, KZ4, KC2, KSC2,
                                KZ2, C_KS1, C_H4, C_H2, C_NBLK, D, DP, C_NB, C_NBP, C_VG, C_NG, C_HAS_MEAN, False)
                else:
                    _pool_block(src_v, stride_vn, blk, b, h, pid_bh, C_MEAN, C_BITS, C_SLOT, VC4, VSC4, VZ4, VC2, VSC2,
                                VZ2, C_VS1, C_H4, C_H2, C_NBLK, D, DP, C_NB, C_NBP, C_VG, C_NG, C_HAS_MEAN, True)
            elif j % 2 == 0:
                _buffer_rows(src_k, src_v, stride_kn, stride_vn, N - start, pid_bh, C_KBUF, C_VBUF, D, DP, C_NB, C_NBP)


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


class ChannelStats(NamedTuple):
    """Per-chunk partials of the statistics pass (`channel_statistics`); None where not computed.

    qpart [B*Hq, n_chunks_q, DP]: max|q| per channel. kpart, vpart [B*Hkv, n_chunks_k, nstat, DP]:
    sum, max, min and (nstat = 4) sum of squares per channel, in fp32 over each chunk's valid rows.
    """

    qpart: torch.Tensor | None
    kpart: torch.Tensor
    vpart: torch.Tensor | None
    nstat: int


def channel_statistics(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor | None, dp: int,
                       sumsq: bool = False, lengths: torch.Tensor | None = None) -> ChannelStats:
    """One launch over the rows of Q (max|q|, when q is given), K and V (when v is given).

    sumsq adds the per-channel sum of squares to K's and V's partials (head priorities need it).
    lengths: optional int32 [B] on k's device; sequence b's K/V rows stop at lengths[b].
    """
    b, hkv, nk, d = k.shape
    nstat = 4 if sumsq else 3
    hq, nq = (q.shape[1], q.shape[2]) if q is not None else (0, 0)
    n_chunks_q = triton.cdiv(nq, STATS_CHUNK)
    n_chunks_k = triton.cdiv(nk, STATS_CHUNK)
    qx = q if q is not None else k
    qpart = torch.empty((b * hq, n_chunks_q, dp), device=k.device, dtype=torch.float32) if q is not None else None
    kpart = torch.empty((b * hkv, n_chunks_k, nstat, dp), device=k.device, dtype=torch.float32)
    vpart = torch.empty_like(kpart) if v is not None else None
    vx = v if v is not None else k
    n_q_programs = b * hq
    n_kv_programs = b * hkv * (2 if v is not None else 1)
    _channel_stats_kernel[(max(n_chunks_q, n_chunks_k), n_q_programs + n_kv_programs)](
        qx, k, vx, qpart if qpart is not None else kpart, kpart, vpart if vpart is not None else kpart,
        lengths if lengths is not None else kpart,
        qx.stride(0), qx.stride(1), qx.stride(2), k.stride(0), k.stride(1), k.stride(2),
        vx.stride(0), vx.stride(1), vx.stride(2), max(hq, 1), hkv, nq, nk, n_q_programs, b * hkv, n_chunks_q, n_chunks_k,
        CHUNK=STATS_CHUNK, SUB=STATS_SUB, SUB_K=STATS_SUB_K, DP=dp, D=d, NSTAT=nstat, HAS_LEN=lengths is not None,
        num_warps=QUANT_NUM_WARPS)
    return ChannelStats(qpart, kpart, vpart, nstat)


def head_moments(stats: ChannelStats, lengths: torch.Tensor, mean_out: torch.Tensor | None,
                 priority: bool) -> torch.Tensor | None:
    """One launch over the statistics pass's partials (see `_head_moments_kernel`).

    lengths: int32 [B] on the device. mean_out: fp32 [B, H, D] that receives K's per-channel mean
    (None: not computed, and K's moments are about 0). priority: return float64 [B, H, 2, 5]
    moments for `assign_bits_from_moments` (stats must hold V and sums of squares).
    """
    bh, n_chunks, nstat, dp = stats.kpart.shape
    b = lengths.numel()
    h = bh // b
    if priority and (stats.vpart is None or nstat != 4):
        raise ValueError("head priorities need V's statistics with sums of squares")
    d = mean_out.shape[-1] if mean_out is not None else dp
    mom = torch.empty((b, h, 2, 5), device=stats.kpart.device, dtype=torch.float64) if priority else None
    _head_moments_kernel[(b, h)](stats.kpart, stats.vpart if stats.vpart is not None else stats.kpart, lengths,
                                 mean_out if mean_out is not None else stats.kpart,
                                 mom if mom is not None else stats.kpart, h, n_chunks, DP=dp, D=d, NSTAT=nstat,
                                 CH=MOMENT_CHUNKS, WRITE_MEAN=mean_out is not None, PRIORITY=priority,
                                 num_warps=QUANT_NUM_WARPS)
    return mom


def assign_bits_from_moments(mom: torch.Tensor, n_low: int, count: int, prio: torch.Tensor, bits: torch.Tensor,
                             slots: torch.Tensor) -> None:
    """Priorities and bit assignment on the device (no host synchronisation); see `_assign_bits_kernel`.

    mom: float64 [B, H, 2, 5] from `head_moments`; count = sum(lengths) * D. Writes prio fp32 [H] and
    bits, slots int32 [H] (all zero priorities when count is 0: the first n_low heads get 2 bits).
    """
    b, h = mom.shape[0], mom.shape[1]
    _assign_bits_kernel[(1,)](mom, prio, bits, slots, b, h, n_low, float(max(count, 1)),
                              HP=max(16, triton.next_power_of_2(h)), num_warps=1)


def smoothing_from_stats(stats: ChannelStats, group: int, n_k_rows: int, fold: float, d: int, dp: int,
                         balance: str = "qk") -> torch.Tensor:
    """[B * Hkv, 3, DP] fp32: K's per-channel mean mu, 1/c and c (reference.smooth_k + balance_qk_channels).

    balance "qk" needs stats.qpart (Q's per-channel max); "k" and "none" do not read it.
    """
    if balance == "qk" and stats.qpart is None:
        raise ValueError("balance='qk' needs Q's statistics (channel_statistics with q)")
    bh, n_chunks_k = stats.kpart.shape[0], stats.kpart.shape[1]
    n_chunks_q = stats.qpart.shape[1] if balance == "qk" else 0
    smooth = torch.empty((bh, 3, dp), device=stats.kpart.device, dtype=torch.float32)
    _smoothing_kernel[(bh,)](stats.qpart if balance == "qk" else stats.kpart, stats.kpart, smooth, group, n_k_rows,
                             n_chunks_q, n_chunks_k, float(fold), DP=dp, D=d, BALANCE=("none", "k", "qk").index(balance),
                             NSTAT=stats.nstat, num_warps=QUANT_NUM_WARPS)
    return smooth


def smoothing_vectors(q: torch.Tensor, k: torch.Tensor, fold: float, dp: int, balance: str = "qk") -> torch.Tensor:
    """[B * Hkv, 3, DP] fp32 smoothing vectors from one statistics pass over K (and Q for "qk")."""
    stats = channel_statistics(q if balance == "qk" else None, k, None, dp)
    return smoothing_from_stats(stats, q.shape[1] // k.shape[1], k.shape[2], fold, k.shape[3], dp, balance)


def quantize_kv_tiles(q, k, v, block_n: int, sm_scale: float, smooth: bool, balance: str = "qk",
                      kv_cache=None, v_fp8: bool = False) -> QuantizedKV:
    """BPQ stage 1 of k and v (validated by the caller) into the attention kernel's layouts.

    q is read only for the smoothing statistics (when `smooth`); the attention kernel quantizes
    Q itself with the returned smoothing vectors. kv_cache: a TurboKVCache (geometry checked by
    the caller) that receives the prompt k, v as `kv_cache.prefill(k, v)` would store it, from
    the same statistics pass and the same pass over K and V. v_fp8: V's tiles as float8 e4m3
    codes (scale max|v| / 448) for the FP8 PV product (compute_format "fp8_pv"), else INT8.
    """
    b, hkv, nk, d = k.shape
    dp = padded_head_dim(d)
    fold = sm_scale * LOG2E
    bits = kv_cache.planned_bits() if kv_cache is not None else None
    cache_stats = kv_cache is not None and (kv_cache.smooth or bits is None)
    vectors = None
    if smooth or cache_stats:
        priority = cache_stats and bits is None
        stats = channel_statistics(q if smooth and balance == "qk" else None, k, v if priority else None, dp,
                                   sumsq=priority)
        if smooth:
            vectors = smoothing_from_stats(stats, q.shape[1] // hkv, nk, fold, d, dp, balance)
    if kv_cache is not None:
        kv_cache.set_lengths([nk] * b)
        kv_cache.begin_prefill(bits, stats if cache_stats else None)
    n_tiles = triton.cdiv(nk, block_n)
    n_pad = n_tiles * block_n
    k_codes = torch.empty((b, hkv, n_pad, dp), device=k.device, dtype=torch.int8)
    vt_codes = torch.empty((b, hkv, dp, n_pad), device=k.device, dtype=torch.float8_e4m3fn if v_fp8 else torch.int8)
    k_scales = torch.empty((b, hkv, n_tiles), device=k.device, dtype=torch.float32)
    v_scales = torch.empty((b, hkv, n_tiles), device=k.device, dtype=torch.float32)
    if kv_cache is not None:
        state, (_, h4, h2, nblk) = kv_cache.kernel_state_args(), kv_cache.kernel_head_args()
        cache_const = dict(C_NB=kv_cache.block_tokens, C_NBP=triton.next_power_of_2(kv_cache.block_tokens),
                           C_VG=kv_cache.config.v_group, C_NG=kv_cache.num_v_groups, C_HAS_MEAN=kv_cache.smooth)
    else:
        state, (h4, h2, nblk) = (k_scales,) * 20, (0, 0, 0)  # the 20 tensors of kernel_state_args, never read
        cache_const = dict(C_NB=16, C_NBP=16, C_VG=16, C_NG=1, C_HAS_MEAN=False)
    n_cache_programs = 2 * triton.cdiv(nk, kv_cache.block_tokens) if kv_cache is not None else 0  # K and V
    _quantize_kv_kernel[(n_tiles + n_cache_programs, b * hkv)](
        k, v, k_codes, vt_codes, k_scales, v_scales, vectors if vectors is not None else k_scales,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), hkv, nk, n_pad, n_tiles,
        *state, h4, h2, nblk,
        BLOCK=block_n, DP=dp, D=d, SMOOTH_K=smooth, CACHE=kv_cache is not None, **cache_const,
        V_FP8=v_fp8, FAST=k.device.type == "cuda",
        num_warps=QUANT_NUM_WARPS if kv_cache is None else CACHE_QUANT_NUM_WARPS)
    return QuantizedKV(k_codes, k_scales, vt_codes, v_scales, vectors, dp, nk)


def quantize_kv_for(q, k, v, config, sm_scale: float, kv_cache=None) -> QuantizedKV:
    """`quantize_kv_tiles` with a KernelConfig's tile, smoothing and V format (the prefill's pass)."""
    return quantize_kv_tiles(q, k, v, config.block_n, sm_scale, config.smooth_k, config.balance, kv_cache=kv_cache,
                             v_fp8=config.compute_format == "fp8_pv")
