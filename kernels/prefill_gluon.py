"""FlashQ prefill attention in Gluon, with the tensor cores kept busy during the softmax (experimental).

Same numerics as kernels/prefill.py (its module docstring; exp2 softmax, P per tile row or at the
fixed scale, INT8 QK^T and PV, the magic-number conversions), same inputs (Q in fp16/bf16/fp32,
quantized here per Q tile; K and V codes from kernels.quant). What differs is the schedule, which
Triton's `tl.dot` cannot express: an INT8 wgmma is asynchronous, and Triton waits for each product
right after issuing it, so a program's softmax and its tensor-core work never overlap (only other
programs on the SM fill the gap). Here, per KV tile j:
    issue cp.async of tile j + 2's K and V (a ring of three shared-memory slots)
    issue S_{j+1} = Q K_{j+1}^T (async wgmma)          <- runs on the tensor cores ...
    softmax of S_j, P_j quantized to INT8               <- ... while the warps do this
    issue PV_j = P_j V_j (async wgmma, P from registers); wait for both; update the accumulator
sm_90 SASS (python -m pytest tests/test_prefill_gluon.py) shows the next tile's wgmma instructions
interleaved with the current tile's MUFU.EX2. Status: compiles for sm_90 and is checked there
offline; its GPU tests (reference and exact attention) have not run yet: not used by
turbo_attention until they do. Scope: D = 64 or 128, Br = 64 (one warpgroup of 4 warps),
Bc = 64 or 128, exp2 (no SAS, no threshold), causal or not, GQA, any N.
"""

from __future__ import annotations

import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .checks import check_bool, check_config, check_qkv, check_sm_scale
from .config import REF_MAX_CLAMP, KernelConfig
from .quant import QuantizedKV, quantize_kv_tiles

MAGIC_F = gl.constexpr(12582912.0)  # 1.5 * 2^23 (kernels/sas.py)
MAGIC_I = gl.constexpr(0x4B400000)
LOG2_127 = math.log2(127.0)
GLUON_HEAD_DIMS = (64, 128)
GLUON_BLOCK_N = (64, 128)
GLUON_BLOCK_M = 64
NUM_BUF = 3  # shared-memory slots for K and V tiles: prefetch distance 2
_EX2_FTZ = gl.constexpr("ex2.approx.ftz.f32 $0, $1;")


@gluon.jit
def _ex2(x):
    return gl.inline_asm_elementwise(_EX2_FTZ, "=f,f", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _issue_tile(k_smem, v_smem, k_ptrs, v_ptrs, tile, n_tiles, D: gl.constexpr, BN: gl.constexpr,
                NUM_BUF: gl.constexpr):
    """cp.async of K tile `tile` ([BN, D], rows of D bytes; k_ptrs: tile 0's addresses) and V^T tile
    ([D, BN], tokens contiguous) into slot tile % NUM_BUF; past the last tile the copies are masked
    off (zero fill) and the group is still committed, so that the group count stays regular."""
    slot = tile % NUM_BUF
    ok = tile < n_tiles
    start = tile * BN
    async_copy.async_copy_global_to_shared(k_smem.index(slot), k_ptrs + start * D,
                                           mask=gl.full(k_ptrs.shape, 1, gl.int1, k_ptrs.type.layout) & ok)
    async_copy.async_copy_global_to_shared(v_smem.index(slot), v_ptrs + start,
                                           mask=gl.full(v_ptrs.shape, 1, gl.int1, v_ptrs.type.layout) & ok)
    async_copy.commit_group()


@gluon.jit
def _tile_step(tile, n_tiles, s_int, m_i, l_i, acc, q_smem, k_smem, v_smem, k_ptrs, v_ptrs, KS_base, VS_base,
               q_scale, zero_s, zero_o, offs_m, offs_n, NK, MASKED: gl.constexpr, CAUSAL: gl.constexpr,
               P_ROW: gl.constexpr, REF_CLAMP: gl.constexpr, LOG2_P_SCALE: gl.constexpr, D: gl.constexpr,
               BN: gl.constexpr, NUM_BUF: gl.constexpr, p_layout: gl.constexpr, row_o: gl.constexpr):
    """KV tile `tile` with its scores s_int already computed; returns the next tile's scores and the
    updated softmax state (module docstring for the schedule)."""
    # every warp is past the products that read slot (tile + 2) % NUM_BUF (tile - 1's K and V)
    gl.thread_barrier()
    _issue_tile(k_smem, v_smem, k_ptrs, v_ptrs, tile + 2, n_tiles, D, BN, NUM_BUF)
    async_copy.wait_group(1)  # tile + 1's K (and tile's V) have landed
    # each thread orders its shared-memory writes before the tensor cores' (async proxy) reads, then all meet
    fence_async_shared()
    gl.thread_barrier()
    # the next tile's scores on the tensor cores while this tile's softmax runs (past the last tile
    # the slot holds zeros: that product is never read)
    s_next_tok = warpgroup_mma(q_smem, k_smem.index((tile + 1) % NUM_BUF).permute((1, 0)), zero_s,
                               use_acc=False, is_async=True)
    scale = gl.maximum(q_scale * gl.load(KS_base + tile), 1e-30)
    y = (s_int + MAGIC_I).to(gl.float32, bitcast=True)  # MAGIC_F + s exactly (|s| < 2^22)
    if MASKED:
        cols = tile * BN + offs_n
        valid = cols[None, :] < NK
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        y = gl.where(valid, y, float("-inf"))
    m_tile = (gl.max(y, axis=1) - MAGIC_F) * scale
    m_new = gl.maximum(m_i, m_tile)
    if P_ROW:
        m_ref = gl.maximum(m_tile, m_new - REF_CLAMP)
    else:
        m_ref = m_new
    bias = MAGIC_F * scale + m_ref - LOG2_P_SCALE
    p = _ex2(y * scale - bias[:, None])  # 127 * 2^(s - m_ref)
    alpha = gl.exp2(m_i - m_new)
    r = gl.exp2(m_ref - m_new)
    l_i = l_i * alpha + r * gl.sum(p, axis=1)
    p8 = gl.convert_layout((p + MAGIC_F).to(gl.int32, bitcast=True).to(gl.int8), p_layout)
    pv_tok = warpgroup_mma(p8, v_smem.index(tile % NUM_BUF).permute((1, 0)), zero_o, use_acc=False, is_async=True)
    s_next, pv = warpgroup_mma_wait(num_outstanding=0, deps=(s_next_tok, pv_tok))
    coef = gl.convert_layout(r * gl.load(VS_base + tile), row_o)
    alpha_o = gl.convert_layout(alpha, row_o)
    # acc * alpha + pv * coef, pv read as MAGIC_F + pv: two FMAs and an integer add (kernels/prefill.py)
    magic_coef = coef[:, None] * MAGIC_F
    acc = (acc * alpha_o[:, None] - magic_coef) + (pv + MAGIC_I).to(gl.float32, bitcast=True) * coef[:, None]
    return s_next, m_new, l_i, acc


@gluon.jit
def _gluon_flashq_kernel(Qx, KC, VT, KS, VS, SMOOTH, Out,
                         stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on,
                         HQ, GROUP, NQ, NK, NK_PAD, n_k_tiles, fold,
                         D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, SMOOTH_K: gl.constexpr,
                         CAUSAL: gl.constexpr, P_ROW: gl.constexpr, REF_CLAMP: gl.constexpr,
                         LOG2_P_SCALE: gl.constexpr, NUM_BUF: gl.constexpr, num_warps: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    q_ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // D, D // 8], [4, 1], [1, 0])
    k_ld: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // D, D // 16], [4, 1], [1, 0])
    v_ld: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // BN, BN // 16], [4, 1], [1, 0])
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, D], gl.int8)
    k_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], gl.int8)
    v_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, BN], gl.int8)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)

    pid = gl.program_id(0)
    if CAUSAL:
        pid = gl.num_programs(0) - 1 - pid  # heaviest tiles first
    pid_bh = gl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kv_bh = (b * (HQ // GROUP) + h // GROUP).to(gl.int64)
    start_m = pid * BM

    # Q tile: scaled by fold (and c, with smoothing), quantized to INT8 against its own max, to shared memory
    qm = start_m + gl.arange(0, BM, layout=gl.SliceLayout(1, q_ld))
    qd = gl.arange(0, D, layout=gl.SliceLayout(0, q_ld))
    q_ptrs = Qx + b.to(gl.int64) * stride_qb + h.to(gl.int64) * stride_qh + qm[:, None].to(gl.int64) * stride_qn
    q_ok = (qm[:, None] < NQ) & (qd[None, :] < D)
    qf = gl.load(q_ptrs + qd[None, :], mask=q_ok, other=0.0).to(gl.float32)
    if SMOOTH_K:
        qf = qf * (gl.load(SMOOTH + kv_bh * 3 * D + 2 * D + qd) * fold)[None, :]
    else:
        qf = qf * fold
    amax = gl.max(gl.max(gl.abs(qf), axis=1), axis=0)
    inv = gl.where(amax > 0, 127.0 / amax, 0.0)
    yq = qf * inv
    q8 = (yq + gl.where(yq >= 0, 0.5, -0.5)).to(gl.int32).to(gl.int8)
    q_scale = amax / 127.0
    q_smem = gl.allocate_shared_memory(gl.int8, [BM, D], q_sl, q8)

    K_base = KC + kv_bh * NK_PAD * D
    VT_base = VT + kv_bh * D * NK_PAD
    KS_base = KS + kv_bh * n_k_tiles
    VS_base = VS + kv_bh * n_k_tiles
    k_smem = gl.allocate_shared_memory(gl.int8, [NUM_BUF, BN, D], k_sl)
    v_smem = gl.allocate_shared_memory(gl.int8, [NUM_BUF, D, BN], v_sl)
    rows_k = gl.arange(0, BN, layout=gl.SliceLayout(1, k_ld))
    cols_k = gl.arange(0, D, layout=gl.SliceLayout(0, k_ld))
    rows_v = gl.arange(0, D, layout=gl.SliceLayout(1, v_ld))
    cols_v = gl.arange(0, BN, layout=gl.SliceLayout(0, v_ld))
    k_ptrs = K_base + rows_k[:, None] * D + cols_k[None, :]
    v_ptrs = VT_base + rows_v[:, None] * NK_PAD + cols_v[None, :]

    full_end = (NK // BN) * BN
    if CAUSAL:
        free_end = gl.minimum(((start_m + 1) // BN) * BN, full_end)  # tiles before it need no mask
        hi = gl.minimum(start_m + BM, NK)
    else:
        free_end = full_end
        hi = NK
    n_free = free_end // BN
    n_tiles = gl.cdiv(hi, BN)

    _issue_tile(k_smem, v_smem, k_ptrs, v_ptrs, 0, n_tiles, D, BN, NUM_BUF)
    _issue_tile(k_smem, v_smem, k_ptrs, v_ptrs, 1, n_tiles, D, BN, NUM_BUF)
    async_copy.wait_group(1)
    fence_async_shared()  # the Q tile's stores and the copies, before the tensor cores read them
    gl.thread_barrier()
    zero_s = gl.zeros([BM, BN], gl.int32, s_layout)
    zero_o = gl.zeros([BM, D], gl.int32, o_layout)
    s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s_int = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))

    offs_m = start_m + gl.arange(0, BM, layout=row_s)
    offs_n = gl.arange(0, BN, layout=col_s)
    m_i = gl.full([BM], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([BM], gl.float32, row_s)
    acc = gl.zeros([BM, D], gl.float32, o_layout)
    for tile in range(0, n_free):
        s_int, m_i, l_i, acc = _tile_step(tile, n_tiles, s_int, m_i, l_i, acc, q_smem, k_smem, v_smem, k_ptrs, v_ptrs,
                                          KS_base, VS_base, q_scale, zero_s, zero_o, offs_m, offs_n, NK, False, CAUSAL,
                                          P_ROW, REF_CLAMP, LOG2_P_SCALE, D, BN, NUM_BUF, p_layout, row_o)
    for tile in range(n_free, n_tiles):
        s_int, m_i, l_i, acc = _tile_step(tile, n_tiles, s_int, m_i, l_i, acc, q_smem, k_smem, v_smem, k_ptrs, v_ptrs,
                                          KS_base, VS_base, q_scale, zero_s, zero_o, offs_m, offs_n, NK, True, CAUSAL,
                                          P_ROW, REF_CLAMP, LOG2_P_SCALE, D, BN, NUM_BUF, p_layout, row_o)
    async_copy.wait_group(0)
    inv_l = gl.convert_layout(1.0 / l_i, row_o)
    om = start_m + gl.arange(0, BM, layout=row_o)
    od = gl.arange(0, D, layout=col_o)
    o_ptrs = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh + om[:, None].to(gl.int64) * stride_on
    gl.store(o_ptrs + od[None, :], (acc * inv_l[:, None]).to(Out.dtype.element_ty),
             mask=(om[:, None] < NQ) & (od[None, :] < D))


def check_gluon_config(config: KernelConfig, d: int) -> None:
    """Raise ValueError naming what this kernel does not cover (see the module docstring)."""
    if d not in GLUON_HEAD_DIMS:
        raise ValueError(f"the Gluon prefill kernel takes head_dim in {GLUON_HEAD_DIMS}, got {d}")
    if config.block_m != GLUON_BLOCK_M or config.num_warps != 4:
        raise ValueError(f"the Gluon prefill kernel runs block_m={GLUON_BLOCK_M} with num_warps=4 (one warpgroup), "
                         f"got block_m={config.block_m}, num_warps={config.num_warps}")
    if config.block_n not in GLUON_BLOCK_N:
        raise ValueError(f"the Gluon prefill kernel takes block_n in {GLUON_BLOCK_N}, got {config.block_n}")
    if config.use_sas or config.sparsity_threshold is not None:
        raise ValueError("the Gluon prefill kernel computes exp2 without a threshold: use_sas=False, "
                         "sparsity_threshold=None")
    if config.compute_format != "int8":
        raise ValueError(f"the Gluon prefill kernel runs compute_format='int8' only, got {config.compute_format!r}")


def launch_flashq_gluon(q: torch.Tensor, kv: QuantizedKV, out: torch.Tensor, causal: bool, config: KernelConfig,
                        sm_scale: float) -> torch.Tensor:
    """The Gluon kernel over kernels.quant.quantize_kv_tiles' output (block_n tiles); writes out."""
    b, hq, nq, d = out.shape
    check_gluon_config(config, d)
    if kv.head_dim_padded != d:
        raise ValueError(f"K/V codes padded to {kv.head_dim_padded} channels; the Gluon kernel needs {d}")
    if not out.is_cuda:
        raise ValueError("the Gluon prefill kernel needs CUDA tensors (it has no interpreter path)")
    hkv, nk_pad = kv.k_codes.shape[1], kv.k_codes.shape[2]
    n_q_tiles = triton.cdiv(nq, GLUON_BLOCK_M)
    _gluon_flashq_kernel[(n_q_tiles, b * hq)](
        q, kv.k_codes, kv.vt_codes, kv.k_scales, kv.v_scales, kv.smooth if kv.smooth is not None else kv.k_scales,
        out, q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hq, hq // hkv, nq, kv.n_rows, nk_pad, kv.k_scales.shape[-1], float(sm_scale * math.log2(math.e)),
        D=d, BM=GLUON_BLOCK_M, BN=config.block_n, SMOOTH_K=kv.smooth is not None, CAUSAL=causal,
        P_ROW=config.p_scale == "row", REF_CLAMP=REF_MAX_CLAMP, LOG2_P_SCALE=LOG2_127, NUM_BUF=NUM_BUF,
        num_warps=4)
    return out


def turbo_attention_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                          sm_scale: float | None = None, config: KernelConfig | None = None) -> torch.Tensor:
    """kernels.turbo_attention's contract (q [B, Hq, N, D], k, v [B, Hkv, N, D], fp16/bf16/fp32) on the
    Gluon kernel: the quantization pass, then `launch_flashq_gluon`. config=None: KernelConfig().
    Bad inputs and what the kernel does not cover raise ValueError / TypeError before any launch."""
    b, hq, hkv, nq, nk, d = check_qkv(q, k, v, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                                      head_dims=GLUON_HEAD_DIMS, same_len=True)
    check_bool("causal", causal)
    check_sm_scale(sm_scale)
    config = check_config(config) or KernelConfig()
    check_gluon_config(config, d)
    if not q.is_cuda:
        raise ValueError(f"the Gluon prefill kernel needs CUDA tensors (it has no interpreter path), got {q.device}")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    kv = quantize_kv_tiles(q, k, v, config.block_n, scale, config.smooth_k, config.balance)
    out = torch.empty((b, hq, nq, d), device=q.device, dtype=q.dtype)
    return launch_flashq_gluon(q, kv, out, causal, config, scale)
