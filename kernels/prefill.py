"""FlashQ prefill attention in Triton: INT8 QK^T, base-2 online softmax with SAS, INT8 PV.

Math per KV tile j (the reference's `flashq_attention`, same order):
  s = (Qc Kc_j^T) s_q s_k;  m_new = max(m, rowmax s);  m_ref = max(rowmax s, m_new - 64) ("row") or m_new
  p127 = 127 * 2^(s - m_ref) (SAS polynomial or exp2), 0 where s <= m_new - T
  l = l 2^(m - m_new) + 2^(m_ref - m_new) sum p127;  acc = acc 2^(m - m_new) + (round(p127) Vc_j) 2^(m_ref - m_new) s_v
  o = acc / l
Layouts: codes from `kernels.quant` (Q, K [.., N_pad, Dp] rows; V transposed [.., Dp, N_pad]), so
both products have a K-major second operand. One program per (Q tile of BLOCK_M rows, batch x
query head); KV head = query head // group (GQA without copies). Causal: the KV tiles fully
under the diagonal run unmasked, the diagonal band in a second, masked loop. The paper calls
this FlashQ (products) + SAS (softmax).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .checks import check_bool, check_config, check_qkv, check_sm_scale
from .config import REF_MAX_CLAMP, KernelConfig
from .quant import QuantizedTiles, quantize_qkv_tiles
from .sas import MAGIC_F, MAGIC_I, round_to_uint7, sas_exp2_times_127

LOG2_127 = math.log2(127.0)
PREFILL_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _flashq_tiles(acc, l_i, m_i, q, q_scale, K_base, VT_base, KS_base, VS_base, lo, hi, nk, nk_pad,
                  offs_m, offs_n, offs_d, threshold,
                  BLOCK_N: tl.constexpr, DP: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  USE_SAS: tl.constexpr, HAS_THRESHOLD: tl.constexpr, P_ROW: tl.constexpr,
                  REF_CLAMP: tl.constexpr, LOG2_P_SCALE: tl.constexpr):
    """KV tiles [lo, hi) of one Q tile; MASKED applies the causal diagonal and the N bound."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = tl.load(K_base + cols[None, :] * DP + offs_d[:, None])  # [DP, BLOCK_N], D contiguous
        tile = start_n // BLOCK_N
        scale = tl.maximum(q_scale * tl.load(KS_base + tile), 1e-30)
        s_int = tl.dot(q, k, out_dtype=tl.int32)
        # y = MAGIC_F + s_int exactly (|s_int| <= 127 * 127 * 128 < 2^22): no I2F conversion
        y = (s_int + MAGIC_I).to(tl.float32, bitcast=True)
        if MASKED:
            valid = cols[None, :] < nk
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            y = tl.where(valid, y, float("-inf"))
        m_tile = (tl.max(y, 1) - MAGIC_F) * scale
        m_new = tl.maximum(m_i, m_tile)
        if P_ROW:
            m_ref = tl.maximum(m_tile, m_new - REF_CLAMP)
        else:
            m_ref = m_new
        # x = s - m_ref (+ log2 127 for the exact path), one FMA per score
        if USE_SAS:
            bias = MAGIC_F * scale + m_ref
        else:
            bias = MAGIC_F * scale + m_ref - LOG2_P_SCALE
        x = y * scale - bias[:, None]
        if HAS_THRESHOLD:
            # keep s > m_new - T, i.e. x > m_new - T - m_ref (+ log2 127 on the exact path)
            if USE_SAS:
                keep_above = m_new - threshold - m_ref
            else:
                keep_above = m_new - threshold - m_ref + LOG2_P_SCALE
            x = tl.where(x > keep_above[:, None], x, float("-inf"))
        if USE_SAS:
            p = sas_exp2_times_127(x)
        else:
            p = tl.exp2(x)
        alpha = tl.exp2(m_i - m_new)
        r = tl.exp2(m_ref - m_new)
        l_i = l_i * alpha + r * tl.sum(p, 1)
        p8 = round_to_uint7(p)
        vt = tl.load(VT_base + offs_d[None, :] * nk_pad + cols[:, None])  # [BLOCK_N, DP], tokens contiguous
        pv = tl.dot(p8, vt, out_dtype=tl.int32)
        pv_f = (pv + MAGIC_I).to(tl.float32, bitcast=True) - MAGIC_F  # exact: |pv| <= 127 * 127 * 256 < 2^22
        coef = r * tl.load(VS_base + tile)
        acc = acc * alpha[:, None] + pv_f * coef[:, None]
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flashq_fwd_kernel(QC, KC, VT, QS, KS, VS, Out,
                       stride_ob, stride_oh, stride_on,
                       HQ, GROUP, NQ, NK, NQ_PAD, NK_PAD, n_q_tiles, n_k_tiles, threshold,
                       D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, USE_SAS: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
                       P_ROW: tl.constexpr, REF_CLAMP: tl.constexpr, LOG2_P_SCALE: tl.constexpr):
    """One Q tile of BLOCK_M rows for one (batch, query head); see the module docstring."""
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0)
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
    offs_d = tl.arange(0, DP)

    q = tl.load(QC + pid_bh.to(tl.int64) * NQ_PAD * DP + offs_m[:, None] * DP + offs_d[None, :])
    q_scale = tl.load(QS + pid_bh.to(tl.int64) * n_q_tiles + pid)
    K_base = KC + kv_bh * NK_PAD * DP
    VT_base = VT + kv_bh * DP * NK_PAD
    KS_base = KS + kv_bh * n_k_tiles
    VS_base = VS + kv_bh * n_k_tiles

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
    full_end = (NK // BLOCK_N) * BLOCK_N
    if CAUSAL:
        # tiles whose every column is <= the tile's first row need no mask
        free_end = tl.minimum(((start_m + 1) // BLOCK_N) * BLOCK_N, full_end)
        hi = tl.minimum(start_m + BLOCK_M, NK)
    else:
        free_end = full_end
        hi = NK
    acc, l_i, m_i = _flashq_tiles(acc, l_i, m_i, q, q_scale, K_base, VT_base, KS_base, VS_base, 0, free_end,
                                  NK, NK_PAD, offs_m, offs_n, offs_d, threshold, BLOCK_N, DP, False, CAUSAL,
                                  USE_SAS, HAS_THRESHOLD, P_ROW, REF_CLAMP, LOG2_P_SCALE)
    acc, l_i, m_i = _flashq_tiles(acc, l_i, m_i, q, q_scale, K_base, VT_base, KS_base, VS_base, free_end, hi,
                                  NK, NK_PAD, offs_m, offs_n, offs_d, threshold, BLOCK_N, DP, True, CAUSAL,
                                  USE_SAS, HAS_THRESHOLD, P_ROW, REF_CLAMP, LOG2_P_SCALE)
    out = acc / l_i[:, None]
    o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D))


def _check_device(q: torch.Tensor) -> None:
    if q.device.type == "cuda":
        return
    if os.environ.get("TRITON_INTERPRET") == "1" and q.device.type == "cpu":
        return
    raise ValueError(f"q, k, v must be CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
                     f"triton is imported), got device {q.device}")


def flashq_attention_from_tiles(tiles: QuantizedTiles, out: torch.Tensor, nk: int, causal: bool, config: KernelConfig) -> torch.Tensor:
    """Launch the attention kernel on already-quantized tiles; writes `out` [B, Hq, Nq, D]."""
    b, hq, nq, d = out.shape
    hkv = tiles.k_codes.shape[1]
    n_q_tiles = tiles.q_scales.shape[-1]
    n_k_tiles = tiles.k_scales.shape[-1]
    threshold = config.sparsity_threshold
    grid = (n_q_tiles, b * hq)
    _flashq_fwd_kernel[grid](
        tiles.q_codes, tiles.k_codes, tiles.vt_codes, tiles.q_scales, tiles.k_scales, tiles.v_scales, out,
        out.stride(0), out.stride(1), out.stride(2),
        hq, hq // hkv, nq, nk, tiles.q_codes.shape[2], tiles.k_codes.shape[2], n_q_tiles, n_k_tiles,
        float(threshold) if threshold is not None else 0.0,
        D=d, DP=tiles.head_dim_padded, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        CAUSAL=causal, USE_SAS=config.use_sas, HAS_THRESHOLD=threshold is not None,
        P_ROW=config.p_scale == "row", REF_CLAMP=REF_MAX_CLAMP, LOG2_P_SCALE=LOG2_127,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def turbo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    sm_scale: float | None = None, config: KernelConfig | None = None) -> torch.Tensor:
    """TurboAttention prefill: softmax(q k^T * sm_scale) v with FlashQ INT8 products and SAS.

    q: [B, Hq, N, D]; k, v: [B, Hkv, N, D]; fp16, bf16 or fp32; Hq % Hkv == 0; D in
    {16, 32, 64, 80, 96, 128}; any N >= 1; views with a contiguous last dim are fine and are
    never modified. Returns [B, Hq, N, D] in q's dtype. config=None: the tuned config for this
    GPU (kernels.load_config), else the documented defaults.
    """
    b, hq, hkv, nq, nk, d = check_qkv(q, k, v, dtypes=INPUT_DTYPES, head_dims=PREFILL_HEAD_DIMS, same_len=True)
    check_bool("causal", causal)
    check_sm_scale(sm_scale)
    config = check_config(config)
    _check_device(q)
    if config is None:
        from .loader import load_config

        config = load_config(head_dim=d)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    tiles = quantize_qkv_tiles(q, k, v, config.block_m, config.block_n, scale, config.smooth_k)
    out = torch.empty((b, hq, nq, d), device=q.device, dtype=q.dtype)
    return flashq_attention_from_tiles(tiles, out, nk, causal, config)
