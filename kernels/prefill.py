"""FlashQ prefill attention in Triton: INT8 QK^T, base-2 online softmax with SAS, INT8 PV.

Math per KV tile j (the reference's `flashq_attention`, same order):
  s = (Qc Kc_j^T) s_q s_k;  m_new = max(m, rowmax s);  m_ref = max(rowmax s, m_new - 64) ("row") or m_new
  p127 = 127 * 2^(s - m_ref) (SAS polynomial or exp2), 0 where s <= m_new - T
  l = l 2^(m - m_new) + 2^(m_ref - m_new) sum p127;  acc = acc 2^(m - m_new) + (round(p127) Vc_j) 2^(m_ref - m_new) s_v
  o = acc / l
Layouts: codes from `kernels.quant` (Q, K [.., N_pad, Dp] rows; V transposed [.., Dp, N_pad]), so
both products have a K-major second operand. One program per (Q tile of BLOCK_M rows, batch x
query head); KV head = query head // group (GQA without copies). Causal: the KV tiles fully
under the diagonal run unmasked, the diagonal band in a second, masked loop. With a threshold T,
a tile where no row keeps a score (rowmax s <= m_new - T for every row) skips everything after the
row maxima: its p are all 0 and m_new = m, so the update is the identity. The paper calls this
FlashQ (products) + SAS (softmax).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .checks import check_bool, check_config, check_kernel_device, check_qkv, check_sm_scale
from .config import REF_MAX_CLAMP, KernelConfig
from .quant import QuantizedKV, quantize_kv_for
from .reference import LOG2E
from .sas import MAGIC_F, MAGIC_I, round_to_uint7, sas_exp2_times_127, to_e4m3

LOG2_127 = math.log2(127.0)
PREFILL_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _exp2(x, FAST_EXP: tl.constexpr):
    """2^x on the special-function unit; FAST_EXP flushes denormals (no range fix-up instructions)."""
    if FAST_EXP:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


# x where the comparison with a row bound holds, else a constant: setp + selp in one asm block, so the
# compiler cannot hoist the comparisons and park the tile's predicates as bits of a register (it did,
# for the threshold: three more instructions per score to unpack them)
_ABOVE_ELSE_NEG_INF = tl.constexpr("{ .reg .pred p; setp.gt.f32 p, $1, $2; selp.f32 $0, $1, 0fFF800000, p; }")
_BELOW_ELSE_134 = tl.constexpr("{ .reg .pred p; setp.lt.f32 p, $1, $2; selp.f32 $0, $1, 0f43060000, p; }")


@triton.jit
def _keep(x, bound, ABOVE: tl.constexpr, FAST: tl.constexpr):
    """ABOVE: x where x > bound, else -inf; otherwise x where x < bound, else 134 (bound: [BLOCK_M, 1])."""
    if FAST:
        asm: tl.constexpr = _ABOVE_ELSE_NEG_INF if ABOVE else _BELOW_ELSE_134
        return tl.inline_asm_elementwise(asm, "=f,f,f", [x, tl.broadcast_to(bound, x.shape)],
                                         dtype=tl.float32, is_pure=True, pack=1)
    elif ABOVE:
        return tl.where(x > bound, x, float("-inf"))
    else:
        return tl.where(x < bound, x, 134.0)


@triton.jit
def _fold_columns(x, IS_MAX: tl.constexpr):
    """x [M, N] -> [M, N / 2]: the max (or sum) of columns c and c + N / 2."""
    M: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    a, b = tl.split(tl.permute(tl.reshape(x, [M, 2, N // 2]), (0, 2, 1)))
    if IS_MAX:
        return tl.maximum(a, b)
    else:
        return a + b


@triton.jit
def _row_reduce(x, IS_MAX: tl.constexpr):
    """Row max (or sum) of x [M, N], as a tree: the columns fold in halves first (in registers: on
    sm_90 a thread of the tensor-core layout holds columns c and c + N / 2 down to 8 apart), so
    the dependent chain is ~log2(N) steps deep instead of N / 4 (a plain tl.max / tl.sum walks a
    thread's values one after another, 4+ cycles each, and a tile waited on two such chains)."""
    N: tl.constexpr = x.shape[1]
    if N >= 16:
        x = _fold_columns(x, IS_MAX)
    if N >= 32:
        x = _fold_columns(x, IS_MAX)
    if N >= 64:
        x = _fold_columns(x, IS_MAX)
    if N >= 128:
        x = _fold_columns(x, IS_MAX)
    if N >= 256:
        x = _fold_columns(x, IS_MAX)
    if IS_MAX:
        return tl.max(x, 1)
    else:
        return tl.sum(x, 1)


@triton.jit
def _softmax_pv(y, scale, m_tile, m_new, acc, acc_t, acc_c, l_i, m_i, vt, vt_t, vscale, threshold,
                HAS_TAIL: tl.constexpr, USE_SAS: tl.constexpr, HAS_THRESHOLD: tl.constexpr, P_ROW: tl.constexpr,
                REF_CLAMP: tl.constexpr, LOG2_P_SCALE: tl.constexpr, FAST_EXP: tl.constexpr, FP8_PV: tl.constexpr):
    """One tile's online-softmax update from its scores y (MAGIC_F + s_int, -inf where masked) and its
    INT8 (or FP8) PV product (module docstring): returns acc, acc_t, acc_c, l_i.

    FP8_PV: acc holds the output in units of acc_c per row (the last tile's r * s_v), so a tile
    costs one FMA per element: acc * (alpha * acc_c / coef) + P8 V8, with P8 V8 an fp32 product
    that needs no conversion. INT8: acc_c stays 1."""
    if P_ROW:
        m_ref = tl.maximum(m_tile, m_new - REF_CLAMP)
    else:
        m_ref = m_new
    if USE_SAS:
        # neg = m_ref - s >= 0, one FMA per score; dropped and masked scores go to 134, where the
        # SAS power of two is 0, so the threshold's select is also the range clamp
        bias = MAGIC_F * scale + m_ref
        neg = bias[:, None] - y * scale
        if HAS_THRESHOLD:
            # keep s > m_new - T, i.e. neg < m_ref - (m_new - T)
            drop_at = tl.minimum(m_ref - (m_new - threshold), 134.0)
            neg = _keep(neg, drop_at[:, None], False, FAST_EXP)
        else:
            neg = tl.minimum(neg, 134.0)
        p = sas_exp2_times_127(neg, FAST_EXP)
    else:
        # x = s - m_ref + log2 127, one FMA per score
        bias = MAGIC_F * scale + m_ref - LOG2_P_SCALE
        x = y * scale - bias[:, None]
        if HAS_THRESHOLD:
            # keep s > m_new - T, i.e. x > m_new - T - m_ref + log2 127
            keep_above = m_new - threshold - m_ref + LOG2_P_SCALE
            x = _keep(x, keep_above[:, None], True, FAST_EXP)
        p = _exp2(x, FAST_EXP)
    alpha = tl.exp2(m_i - m_new)
    r = tl.exp2(m_ref - m_new)
    l_i = l_i * alpha + r * _row_reduce(p, False)
    coef = r * vscale
    if FP8_PV:
        # the product starts from zero and the running sum stays on the FMA pipe in fp32 (Hopper's
        # FP8 tensor cores accumulate with fewer mantissa bits than fp32); vscale > 0 always
        p8 = to_e4m3(p, FAST_EXP)
        factor = (alpha * acc_c / coef)[:, None]
        acc = acc * factor + tl.dot(p8, vt)
        if HAS_TAIL:
            acc_t = acc_t * factor + tl.dot(p8, vt_t)
        acc_c = coef
    else:
        p8 = round_to_uint7(p)
        pv = tl.dot(p8, vt, out_dtype=tl.int32)
        # acc * alpha + pv * coef with pv read as MAGIC_F + pv (exact: |pv| <= 127 * 127 * 256 < 2^22):
        # (acc * alpha - MAGIC_F * coef) + y * coef, two FMAs and an integer add per element, no I2F.
        # The offset cancels to within ~1 unit of coef per tile, far under P's own rounding.
        magic_coef = coef[:, None] * MAGIC_F
        acc = (acc * alpha[:, None] - magic_coef) + (pv + MAGIC_I).to(tl.float32, bitcast=True) * coef[:, None]
        if HAS_TAIL:
            pv_t = tl.dot(p8, vt_t, out_dtype=tl.int32)
            acc_t = (acc_t * alpha[:, None] - magic_coef) + (pv_t + MAGIC_I).to(tl.float32, bitcast=True) * coef[:, None]
    return acc, acc_t, acc_c, l_i


@triton.jit
def _flashq_tiles(acc, acc_t, acc_c, l_i, m_i, skipped, q, q_t, q_scale, K_base, VT_base, KS_base, VS_base, lo, hi,
                  nk, nk_pad, offs_m, offs_n, offs_d, offs_dt, threshold, real_row,
                  BLOCK_N: tl.constexpr, DP: tl.constexpr, DH: tl.constexpr, DT: tl.constexpr,
                  HAS_TAIL: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  USE_SAS: tl.constexpr, HAS_THRESHOLD: tl.constexpr, P_ROW: tl.constexpr,
                  REF_CLAMP: tl.constexpr, LOG2_P_SCALE: tl.constexpr, FAST_EXP: tl.constexpr, FP8_PV: tl.constexpr):
    """KV tiles [lo, hi) of one Q tile; MASKED applies the causal diagonal and the N bound.

    The head dim is DH (a power of two) plus, when HAS_TAIL, DT more channels at offset DH
    (D = 96 runs as 64 + 32 instead of padding to 128).
    With a threshold, a tile in which no row keeps a score (every row's tile maximum at or below
    m_new - T) skips its softmax and PV product: there every p is 0 and m_new = m_i (T > 0), so
    the update is the identity. The test needs only the row maxima of the real rows (real_row: the
    Q tile's padding rows past N, never stored, would always look live); `skipped` counts such tiles.
    """
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = tl.load(K_base + cols[None, :] * DP + offs_d[:, None])  # [DH, BLOCK_N], D contiguous
        tile = start_n // BLOCK_N
        scale = tl.maximum(q_scale * tl.load(KS_base + tile), 1e-30)
        s_int = tl.dot(q, k, out_dtype=tl.int32)
        if HAS_TAIL:
            k_t = tl.load(K_base + cols[None, :] * DP + DH + offs_dt[:, None])
            s_int = tl.dot(q_t, k_t, s_int, out_dtype=tl.int32)
        # y = MAGIC_F + s_int exactly (|s_int| <= 127 * 127 * 128 < 2^22): no I2F conversion
        y = (s_int + MAGIC_I).to(tl.float32, bitcast=True)
        if MASKED:
            valid = cols[None, :] < nk
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            y = tl.where(valid, y, float("-inf"))
        m_tile = (_row_reduce(y, True) - MAGIC_F) * scale
        m_new = tl.maximum(m_i, m_tile)
        # V is loaded before the skip branch: the loop's pipelining issues it ahead either way
        vt = tl.load(VT_base + offs_d[None, :] * nk_pad + cols[:, None])  # [BLOCK_N, DH], tokens contiguous
        if HAS_TAIL:
            vt_t = tl.load(VT_base + (DH + offs_dt)[None, :] * nk_pad + cols[:, None])
        else:
            vt_t = vt
        vscale = tl.load(VS_base + tile)
        if HAS_THRESHOLD:
            live = tl.max(((m_tile > m_new - threshold) & real_row).to(tl.int32), 0)
            if live > 0:
                acc, acc_t, acc_c, l_i = _softmax_pv(y, scale, m_tile, m_new, acc, acc_t, acc_c, l_i, m_i, vt, vt_t,
                                                     vscale, threshold, HAS_TAIL, USE_SAS, HAS_THRESHOLD, P_ROW,
                                                     REF_CLAMP, LOG2_P_SCALE, FAST_EXP, FP8_PV)
                m_i = m_new
            skipped += 1 - live
        else:
            acc, acc_t, acc_c, l_i = _softmax_pv(y, scale, m_tile, m_new, acc, acc_t, acc_c, l_i, m_i, vt, vt_t,
                                                 vscale, threshold, HAS_TAIL, USE_SAS, HAS_THRESHOLD, P_ROW,
                                                 REF_CLAMP, LOG2_P_SCALE, FAST_EXP, FP8_PV)
            m_i = m_new
    return acc, acc_t, acc_c, l_i, m_i, skipped


@triton.jit
def _flashq_fwd_kernel(Qx, QS, KC, VT, KS, VS, SMOOTH, Out, SKIPS,
                       stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on,
                       HQ, GROUP, NQ, NK, NK_PAD, n_q_tiles, n_k_tiles, threshold, fold,
                       D: tl.constexpr, DP: tl.constexpr, DH: tl.constexpr, DT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANT_Q: tl.constexpr, SMOOTH_K: tl.constexpr,
                       CAUSAL: tl.constexpr, USE_SAS: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
                       P_ROW: tl.constexpr, REF_CLAMP: tl.constexpr, LOG2_P_SCALE: tl.constexpr,
                       FAST_EXP: tl.constexpr, COUNT_SKIPS: tl.constexpr, FP8_PV: tl.constexpr):
    """One Q tile of BLOCK_M rows for one (batch, query head); see the module docstring.

    COUNT_SKIPS: SKIPS (int64 [2]) += (KV tiles skipped by the threshold, KV tiles visited).

    QUANT_Q: Qx is the caller's float Q (strided); the tile is scaled by fold * c (SMOOTH row 2)
    and quantized to INT8 here. Otherwise Qx holds INT8 codes [B, Hq, n_q_tiles * BLOCK_M, DP]
    and QS their scales.
    """
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0)
    HAS_TAIL: tl.constexpr = DH < D
    pid = tl.program_id(0)
    if CAUSAL:
        pid = tl.num_programs(0) - 1 - pid  # heaviest tiles first
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kv_bh = (b * (HQ // GROUP) + h // GROUP).to(tl.int64)
    start_m = pid * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DH)
    offs_dt = tl.arange(0, DT)

    if QUANT_Q:
        q_ptrs = Qx + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qn
        row_ok = offs_m[:, None] < NQ
        qf = tl.load(q_ptrs + offs_d[None, :], mask=row_ok & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        if SMOOTH_K:
            qf = qf * (tl.load(SMOOTH + kv_bh * 3 * DP + 2 * DP + offs_d) * fold)[None, :]
        else:
            qf = qf * fold
        amax = tl.max(tl.max(tl.abs(qf), axis=1), axis=0)
        if HAS_TAIL:
            tail_ok = row_ok & ((DH + offs_dt)[None, :] < D)
            qft = tl.load(q_ptrs + DH + offs_dt[None, :], mask=tail_ok, other=0.0).to(tl.float32)
            if SMOOTH_K:
                qft = qft * (tl.load(SMOOTH + kv_bh * 3 * DP + 2 * DP + DH + offs_dt) * fold)[None, :]
            else:
                qft = qft * fold
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(qft), axis=1), axis=0))
        inv = tl.where(amax > 0, 127.0 / amax, 0.0)
        yq = qf * inv
        q = (yq + tl.where(yq >= 0, 0.5, -0.5)).to(tl.int32).to(tl.int8)
        if HAS_TAIL:
            yt = qft * inv
            q_t = (yt + tl.where(yt >= 0, 0.5, -0.5)).to(tl.int32).to(tl.int8)
        else:
            q_t = tl.zeros([BLOCK_M, DT], dtype=tl.int8)
        q_scale = amax / 127.0
    else:
        q_ptrs = Qx + pid_bh.to(tl.int64) * n_q_tiles * BLOCK_M * DP + offs_m[:, None] * DP
        q = tl.load(q_ptrs + offs_d[None, :])
        if HAS_TAIL:
            q_t = tl.load(q_ptrs + DH + offs_dt[None, :])
        else:
            q_t = tl.zeros([BLOCK_M, DT], dtype=tl.int8)
        q_scale = tl.load(QS + pid_bh.to(tl.int64) * n_q_tiles + pid)
    K_base = KC + kv_bh * NK_PAD * DP
    VT_base = VT + kv_bh * DP * NK_PAD
    KS_base = KS + kv_bh * n_k_tiles
    VS_base = VS + kv_bh * n_k_tiles

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DH], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, DT], dtype=tl.float32)
    acc_c = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    full_end = (NK // BLOCK_N) * BLOCK_N
    if CAUSAL:
        # tiles whose every column is <= the tile's first row need no mask
        free_end = tl.minimum(((start_m + 1) // BLOCK_N) * BLOCK_N, full_end)
        hi = tl.minimum(start_m + BLOCK_M, NK)
    else:
        free_end = full_end
        hi = NK
    skipped = tl.full([], 0, dtype=tl.int32)
    acc, acc_t, acc_c, l_i, m_i, skipped = _flashq_tiles(
        acc, acc_t, acc_c, l_i, m_i, skipped, q, q_t, q_scale, K_base, VT_base, KS_base, VS_base, 0, free_end, NK, NK_PAD,
        offs_m, offs_n, offs_d, offs_dt, threshold, offs_m < NQ, BLOCK_N, DP, DH, DT, HAS_TAIL, False, CAUSAL,
        USE_SAS, HAS_THRESHOLD, P_ROW, REF_CLAMP, LOG2_P_SCALE, FAST_EXP, FP8_PV)
    acc, acc_t, acc_c, l_i, m_i, skipped = _flashq_tiles(
        acc, acc_t, acc_c, l_i, m_i, skipped, q, q_t, q_scale, K_base, VT_base, KS_base, VS_base, free_end, hi, NK, NK_PAD,
        offs_m, offs_n, offs_d, offs_dt, threshold, offs_m < NQ, BLOCK_N, DP, DH, DT, HAS_TAIL, True, CAUSAL,
        USE_SAS, HAS_THRESHOLD, P_ROW, REF_CLAMP, LOG2_P_SCALE, FAST_EXP, FP8_PV)
    if COUNT_SKIPS:
        tl.atomic_add(SKIPS, skipped.to(tl.int64))
        tl.atomic_add(SKIPS + 1, (free_end // BLOCK_N + tl.cdiv(hi - free_end, BLOCK_N)).to(tl.int64))
    inv_l = acc_c / l_i
    o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_on
    row_ok = offs_m[:, None] < NQ
    tl.store(o_ptrs + offs_d[None, :], (acc * inv_l[:, None]).to(Out.dtype.element_ty),
             mask=row_ok & (offs_d[None, :] < D))
    if HAS_TAIL:
        tl.store(o_ptrs + DH + offs_dt[None, :], (acc_t * inv_l[:, None]).to(Out.dtype.element_ty),
                 mask=row_ok & ((DH + offs_dt)[None, :] < D))


def head_dim_split(d: int) -> tuple[int, int]:
    """(DH, DT): the kernel's head dim as a power of two plus an optional tail of >= 32 channels.

    8-bit tensor-core products need K-multiples of 32, so D = 96 runs as 64 + 32 and D = 80 as
    64 + 32 (16 zero channels) rather than padding to 128; powers of two run whole (DT unused).
    """
    dh = 1 << (d.bit_length() - 1)
    if dh == d or dh < 64:
        return max(16, triton.next_power_of_2(d)), 16
    return dh, max(32, triton.next_power_of_2(d - dh))


def check_gpu_tiles(config: KernelConfig, d: int, device: torch.device) -> None:
    """On a GPU, 8-bit tensor-core products reduce over at least 32 elements: the PV product's
    reduction is block_n and QK^T's the head dim (the interpreter has no such limit)."""
    if device.type != "cuda":
        return
    if config.block_n < 32:
        raise ValueError(f"config.block_n must be >= 32 on a GPU (the 8-bit PV product reduces over block_n "
                         f"and needs at least 32), got {config.block_n}")
    if d < 32:
        raise ValueError(f"head_dim must be >= 32 on a GPU (the 8-bit QK^T product reduces over it), got {d}")


def launch_flashq(q, kv: QuantizedKV, out: torch.Tensor, causal: bool, config: KernelConfig, sm_scale: float,
                  q_scales: torch.Tensor | None = None, skips: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the attention kernel; writes `out` [B, Hq, Nq, D].

    q is the caller's float Q (quantized inside the kernel, with kv.smooth when present), or,
    when q_scales is given, INT8 codes [B, Hq, ceil(Nq / block_m) * block_m, Dp] already folded.
    skips: optional int64 [2] on the device; receives += (KV tiles the sparsity threshold skipped,
    KV tiles visited) over all programs (a threshold of None skips none).
    """
    b, hq, nq, d = out.shape
    hkv, nk_pad = kv.k_codes.shape[1], kv.k_codes.shape[2]
    n_q_tiles = triton.cdiv(nq, config.block_m)
    n_k_tiles = kv.k_scales.shape[-1]
    threshold = config.sparsity_threshold
    dh, dt = head_dim_split(d)
    check_gpu_tiles(config, d, out.device)
    quant_q = q_scales is None
    fp8_pv = config.compute_format == "fp8_pv"
    if fp8_pv != (kv.vt_codes.dtype == torch.float8_e4m3fn):
        raise ValueError(f"config.compute_format={config.compute_format!r} needs V quantized to match "
                         f"(quantize_kv_tiles(..., v_fp8={fp8_pv})), got V codes of {kv.vt_codes.dtype}")
    # the register cap is a compiler option: the interpreter has no registers to cap
    options = dict(maxnreg=config.max_registers) if config.max_registers is not None and out.is_cuda else {}
    _flashq_fwd_kernel[(n_q_tiles, b * hq)](
        q, q_scales if q_scales is not None else kv.k_scales, kv.k_codes, kv.vt_codes, kv.k_scales, kv.v_scales,
        kv.smooth if kv.smooth is not None else kv.k_scales, out, skips if skips is not None else kv.k_scales,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hq, hq // hkv, nq, kv.n_rows, nk_pad, n_q_tiles, n_k_tiles,
        float(threshold) if threshold is not None else 0.0, float(sm_scale * LOG2E),
        D=d, DP=kv.head_dim_padded, DH=dh, DT=dt, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        QUANT_Q=quant_q, SMOOTH_K=kv.smooth is not None, CAUSAL=causal, USE_SAS=config.use_sas,
        HAS_THRESHOLD=threshold is not None, P_ROW=config.p_scale == "row", REF_CLAMP=REF_MAX_CLAMP,
        LOG2_P_SCALE=LOG2_127, FAST_EXP=out.device.type == "cuda", COUNT_SKIPS=skips is not None, FP8_PV=fp8_pv,
        num_warps=config.num_warps, num_stages=config.num_stages, **options,
    )
    return out


def check_kv_cache(kv_cache, k: torch.Tensor) -> None:
    """kv_cache must be a TurboKVCache on k's device with k's batch, KV heads and head dim, and room for N."""
    from .cache import TurboKVCache

    if not isinstance(kv_cache, TurboKVCache):
        raise TypeError(f"kv_cache must be a kernels.TurboKVCache or None, got {type(kv_cache).__name__}")
    b, hkv, n, d = k.shape
    want = (kv_cache.batch, kv_cache.num_kv_heads, kv_cache.head_dim)
    if (b, hkv, d) != want:
        raise ValueError(f"kv_cache holds [B={want[0]}, Hkv={want[1]}, D={want[2]}] but k is [B={b}, Hkv={hkv}, "
                         f"N, D={d}]")
    if n > kv_cache.max_len:
        raise ValueError(f"kv_cache has max_len={kv_cache.max_len}, too short for the prompt's N={n} tokens")
    if kv_cache.device != k.device:
        raise ValueError(f"kv_cache is on {kv_cache.device}, k on {k.device}: they must share one device")


def turbo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    sm_scale: float | None = None, config: KernelConfig | None = None,
                    kv_cache=None) -> torch.Tensor:
    """TurboAttention prefill: softmax(q k^T * sm_scale) v with FlashQ INT8 products and SAS.

    q: [B, Hq, N, D]; k, v: [B, Hkv, N, D]; fp16, bf16 or fp32; Hq % Hkv == 0; D in
    {16, 32, 64, 80, 96, 128}; any N >= 1; views with a contiguous last dim are fine and are
    never modified. Returns [B, Hq, N, D] in q's dtype. config=None: the tuned config for this
    GPU (kernels.load_config), else the documented defaults.
    kv_cache: optional kernels.TurboKVCache (same batch, KV heads and D; max_len >= N). The prompt's
    K and V are stored into it as `kv_cache.prefill(k, v)` would (same contents, the cache's own
    config: bits, buffer, smoothing), by the quantization pass that reads K and V for the attention
    anyway, so filling the cache costs no second read of K and V; decode with `kv_cache.decode`.
    """
    b, hq, hkv, nq, nk, d = check_qkv(q, k, v, dtypes=INPUT_DTYPES, head_dims=PREFILL_HEAD_DIMS, same_len=True)
    check_bool("causal", causal)
    check_sm_scale(sm_scale)
    config = check_config(config)
    check_kernel_device(q.device, "q, k, v must be CUDA tensors")
    if kv_cache is not None:
        check_kv_cache(kv_cache, k)
    if config is None:
        from .loader import load_config

        config = load_config(head_dim=d, seq_len=nq)
    check_gpu_tiles(config, d, q.device)  # before the quantization pass launches anything
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    kv = quantize_kv_for(q, k, v, config, scale, kv_cache=kv_cache)
    out = torch.empty((b, hq, nq, d), device=q.device, dtype=q.dtype)
    return launch_flashq(q, kv, out, causal, config, scale)
