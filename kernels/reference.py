"""Plain-torch reference of the TurboAttention numerics (DESIGN.md section 4); the ground truth.

Tests, benchmarks and the tuner's accuracy objective all use this module. The Triton kernels do the
same arithmetic in the same order, so a kernel is compared against `turbo_attention_reference`
run with the same KernelConfig tightly, and both are compared against `exact_attention` (fp32)
within a stated floor. Everything runs on CPU or GPU.

Pieces, in the paper's terms:
- FlashQ / BPQ stage 1: per-tile symmetric INT8 of Q (Br rows), K and V (Bc rows), the softmax
  scale and log2(e) folded into Q; INT8 QK^T and INT8 PV inside an online softmax over Bc tiles.
- BPQ stage 2: INT8 codes re-quantized to 4 or 2 bits, asymmetric, integer scale and zero point,
  packed into uint8 words; head priority (gap x std) picks which KV heads get 2 bits.
- SAS: 2^x = LUT[n] * poly3(f) with -x = n + f, and scores T octaves below the row max dropped.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .checks import check_bool, check_config, check_qkv, check_sm_scale, check_tensor
from .config import REF_MAX_CLAMP, KernelConfig

LOG2E = 1.4426950408889634

# Degree-3 polynomial for 2^-f on f in [0, 1), Horner order c0 + f*(c1 + f*(c2 + f*c3)); a
# minimax fit of the relative error (Lawson's iteration, see `fit_sas_polynomial`). Its max
# relative error is 8.4e-5 in fp32; degree 2 reaches only 1.7e-3.
SAS_POLY_COEFFS = (0.9999415, -0.6911163, 0.23018704, -0.03904148)
SAS_POLY_MAX_REL_ERROR = 8.5e-5
# 2^-n for n = 0..126 is exact in fp32 (normal range); past that the LUT returns 0.
SAS_LUT_SIZE = 127
E4M3_MAX = 448.0  # the largest finite float8 e4m3 (fn) value


# ----------------------------------------------------------------------------- exact attention

def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, sm_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * sm_scale) v in fp32: the accuracy yardstick.

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D] with Hq % Hkv == 0 (GQA, K/V shared by Hq/Hkv query
    heads). Causal masking is aligned bottom-right (query i sees keys j <= i + Nk - Nq), as in
    flash-attention; a query row that sees no key returns 0. Returns fp32 [B, Hq, Nq, D].
    """
    _, hq, hkv, nq, nk, d = check_qkv(q, k, v)
    check_bool("causal", causal)
    check_sm_scale(sm_scale)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    group = hq // hkv
    qf = q.float()
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~causal_mask(nq, nk, q.device), float("-inf"))
    m = s.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, vf) / denom.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(denom > 0, out, torch.zeros_like(out))


def causal_mask(nq: int, nk: int, device=None) -> torch.Tensor:
    """[nq, nk] bool, True where query i may see key j (bottom-right aligned)."""
    rows = torch.arange(nq, device=device)[:, None]
    cols = torch.arange(nk, device=device)[None, :]
    return cols <= rows + (nk - nq)


# ----------------------------------------------------------------------------- BPQ stage 1

def fold_softmax_scale(q: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
    """q * sm_scale * log2(e) in fp32, so that scores come out in log2 units (softmax in base 2)."""
    check_tensor("q", q)
    check_sm_scale(sm_scale)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return q.float() * (scale * LOG2E)


def smooth_k(k: torch.Tensor) -> torch.Tensor:
    """K minus its per-channel mean over the sequence (a new tensor; the input is untouched).

    Subtracting a vector mu from every key changes row i's scores by the constant q_i . mu, which
    softmax cancels; it removes the shared offset of outlier channels before quantization.
    """
    check_tensor("k", k, ndim=4)
    kf = k.float()
    return kf - kf.mean(dim=-2, keepdim=True)


def balance_qk_channels(q: torch.Tensor, k: torch.Tensor, mode: str = "qk") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move part of K's per-channel outlier magnitude into Q (SmoothQuant-style, alpha = 1/2).

    c[b, h, d] = sqrt(max_n |k[b, h, :, d]|) / sqrt(max_{n, g} |q[b, h*G + g, :, d]|) per KV head h,
    then k' = k / c and q' = q * c, so q' k'^T = q k^T exactly while both per-tile INT8 grids see
    the same per-channel range. Without it, a K channel scaled 20x takes most of K's INT8 range and
    the ordinary channels lose ~4 bits (cosine 0.997 instead of 0.9995 on outlier inputs).
    mode "k" uses c = sqrt(max_n |k|) alone (no pass over Q; per-tile INT8 is scale-free, so
    the missing normalisation does not matter); "none" returns c = 1.
    q: [B, Hq, N, D] and k: [B, Hkv, N, D], float. Returns (q', k', c) in fp32.
    """
    if mode not in ("qk", "k", "none"):
        raise ValueError(f"mode must be 'qk', 'k' or 'none', got {mode!r}")
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    k_amax = k.float().abs().amax(dim=2)
    q_amax = q.float().abs().amax(dim=2).view(b, hkv, group, d).amax(dim=2)
    tiny = torch.finfo(torch.float32).tiny
    if mode == "k":
        q_amax = torch.ones_like(q_amax)
    c = torch.sqrt(k_amax.clamp_min(tiny)) / torch.sqrt(q_amax.clamp_min(tiny))
    c = torch.where((k_amax > 0) & (q_amax > 0), c, torch.ones_like(c))
    if mode == "none":
        c = torch.ones_like(c)
    q_out = q.float() * c.repeat_interleave(group, dim=1)[:, :, None, :]
    k_out = k.float() / c[:, :, None, :]
    return q_out, k_out, c


def _block_tiles(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles fp32 [B, H, nblocks, block, D], zero-padded past N; their max |x| [B, H, nblocks])."""
    check_tensor("x", x, ndim=4)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    b, h, n, d = x.shape
    nblocks = -(-n // block)
    xf = x.float()
    pad = nblocks * block - n
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    tiles = xf.view(b, h, nblocks, block, d)
    return tiles, tiles.abs().amax(dim=(-1, -2))


def _block_rows(codes: torch.Tensor, n: int) -> torch.Tensor:
    """[B, H, nblocks, block, D] -> [B, H, n, D] (the padding rows dropped)."""
    b, h, nblocks, block, d = codes.shape
    return codes.view(b, h, nblocks * block, d)[:, :, :n]


def quantize_int8_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 per (batch, head, block of `block` rows): s = max|x| / 127.

    x: [B, H, N, D] (any float dtype). Returns codes int8 [B, H, N, D] with
    code = trunc(x * (127 / amax) +- 0.5) (round half away from zero; the kernels do the same),
    and scales fp32 [B, H, ceil(N / block)]. A block of zeros gets scale 0 and codes 0.
    Dequantized, |x - code * s| <= s / 2.
    """
    tiles, amax = _block_tiles(x, block)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    y = tiles * inv[..., None, None]
    codes = torch.trunc(y + torch.where(y >= 0, 0.5, -0.5)).clamp(-127, 127).to(torch.int8)
    return _block_rows(codes, x.shape[2]), amax / 127.0


def quantize_e4m3_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 per (batch, head, block of `block` rows): s = max|x| / 448 (e4m3's largest value).

    x: [B, H, N, D] (any float dtype). Returns codes float8_e4m3fn [B, H, N, D], the fp32 value
    x * (448 / amax) rounded to nearest even on the e4m3 grid (3 mantissa bits; relative error
    <= 2^-4), and scales fp32 [B, H, ceil(N / block)]. A block of zeros gets scale 1 and codes 0
    (so the kernel never divides by a zero scale). Dequantized: codes * s.
    """
    tiles, amax = _block_tiles(x, block)
    inv = torch.where(amax > 0, E4M3_MAX / amax, torch.zeros_like(amax))
    codes = (tiles * inv[..., None, None]).to(torch.float8_e4m3fn)
    return _block_rows(codes, x.shape[2]), torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def dequantize_int8_blocks(codes: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """codes [B, H, N, D] int8 and scales [B, H, nblocks] -> fp32 values."""
    n = codes.shape[-2]
    per_row = scales.repeat_interleave(block, dim=-1)[..., :n]
    return codes.float() * per_row[..., None]


# ----------------------------------------------------------------------------- SAS

def sas_exp2(x: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """SAS exponential: 2^x for x <= 0 as LUT[n] * poly3(f), with -x = n + f, 0 <= f < 1.

    LUT[n] = 2^-n is exact (the kernels build it from exponent bits); poly3 is SAS_POLY_COEFFS in
    Horner order. Values with -x >= threshold (the sparsity threshold T, in log2 units) are 0, and
    so is anything at or past 2^-127 (and -inf). Relative error vs exp2: SAS_POLY_MAX_REL_ERROR.
    """
    check_tensor("x", x)
    limit = float(SAS_LUT_SIZE) if threshold is None else min(float(threshold), float(SAS_LUT_SIZE))
    neg = (-x.float()).clamp(0.0, float(SAS_LUT_SIZE))
    n = torch.floor(neg)
    f = neg - n
    c0, c1, c2, c3 = SAS_POLY_COEFFS
    poly = ((c3 * f + c2) * f + c1) * f + c0
    lut = torch.exp2(-n)  # exact for integer n in [0, 126]
    keep = (-x.float()) < limit
    return torch.where(keep, lut * poly, torch.zeros_like(poly))


def fit_sas_polynomial(degree: int = 3, points: int = 20001, iterations: int = 200) -> tuple[float, ...]:
    """Minimax (relative error) polynomial for 2^-f on [0, 1] by Lawson's reweighted least squares.

    Documents where SAS_POLY_COEFFS come from; tests check that the shipped constants match.
    """
    f = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    y = torch.exp2(-f)
    basis = torch.stack([f**i for i in range(degree + 1)], dim=1)
    weights = torch.full_like(f, 1.0 / points)
    coeffs = None
    for _ in range(iterations):
        w = (weights.sqrt() / y)[:, None]
        coeffs = torch.linalg.lstsq(basis * w, (y * w[:, 0])[:, None]).solution[:, 0]
        err = ((basis @ coeffs - y) / y).abs()
        weights = weights * err
        weights = weights / weights.sum()
    return tuple(float(c) for c in coeffs)


# ----------------------------------------------------------------------------- FlashQ attention

class QuantizedQKV(NamedTuple):
    q_codes: torch.Tensor  # int8 [B, Hq, Nq, D], Q already multiplied by sm_scale * log2(e)
    q_scales: torch.Tensor  # fp32 [B, Hq, ceil(Nq / block_m)]
    k_codes: torch.Tensor  # int8 [B, Hkv, Nk, D] (smoothed if config.smooth_k)
    k_scales: torch.Tensor  # fp32 [B, Hkv, ceil(Nk / block_n)]
    v_codes: torch.Tensor  # int8 [B, Hkv, Nk, D]; float8_e4m3fn with compute_format "fp8_pv"
    v_scales: torch.Tensor  # fp32 [B, Hkv, ceil(Nk / block_n)]


def quantize_qkv(q, k, v, config: KernelConfig | None = None, sm_scale: float | None = None) -> QuantizedQKV:
    """BPQ stage 1 for attention: fold the softmax scale into Q, optionally smooth K (mean, then
    Q/K channel balance), quantize tiles."""
    check_qkv(q, k, v)
    config = check_config(config) or KernelConfig()
    qf = fold_softmax_scale(q, sm_scale)
    kf = smooth_k(k) if config.smooth_k else k.float()
    if config.smooth_k and config.balance != "none":
        qf, kf, _ = balance_qk_channels(qf, kf, config.balance)
    q_codes, q_scales = quantize_int8_blocks(qf, config.block_m)
    k_codes, k_scales = quantize_int8_blocks(kf, config.block_n)
    quantize_v = quantize_e4m3_blocks if config.compute_format == "fp8_pv" else quantize_int8_blocks
    v_codes, v_scales = quantize_v(v, config.block_n)
    return QuantizedQKV(q_codes, q_scales, k_codes, k_scales, v_codes, v_scales)


def flashq_attention(qkv: QuantizedQKV, causal: bool, config: KernelConfig) -> torch.Tensor:
    """INT8 QK^T, base-2 online softmax (SAS or exact), quantized P, INT8 PV over Bc tiles.

    Per KV tile j and query row (scalars per row, tile-wide scales s_q, s_k, s_v):
      s      = (Qc Kc_j^T) * (s_q * s_k)                      exact int products, fp32 scale
      m_new  = max(m_old, max_j s)
      m_ref  = max(max_j s, m_new - 64)   (p_scale "row")  or  m_new  (p_scale "fixed")
      p      = exp2(s - m_ref) (SAS or exact); p = 0 where s <= m_new - T
      alpha  = exp2(m_old - m_new);  r = exp2(m_ref - m_new)
      l      = l * alpha + r * sum_j p
      acc    = acc * alpha + (round(127 p) Vc_j) * (r * s_v / 127)   (round half to even)
    and o = acc / l. compute_format "fp8_pv": Vc_j and round(127 p) are FP8 e4m3 instead
    (`quantize_e4m3_blocks`; 127 p rounded to nearest even on the e4m3 grid), same formula. With "row", P is quantized against its tile-row maximum (r carries the
    difference to the running maximum), which keeps INT8 resolution on flat attention.
    Fully masked tile rows are exact no-ops; a tile whose every p is 0 adds nothing, so the
    kernel may skip its PV product without changing the result. Returns fp32 [B, Hq, Nq, D].
    """
    q_codes, q_scales, k_codes, k_scales, v_codes, v_scales = qkv
    b, hq, nq, d = q_codes.shape
    hkv, nk = k_codes.shape[1], k_codes.shape[2]
    group = hq // hkv
    bm, bn = config.block_m, config.block_n
    threshold = config.sparsity_threshold
    device = q_codes.device
    # int8 x int8 sums over D <= 256 (and P x V over Bc <= 256) stay below 2^24, so fp64
    # matmuls of the codes are exact (and TF32 can never round them).
    qc = q_codes.double()
    kc = k_codes.double().repeat_interleave(group, dim=1)
    fp8_pv = config.compute_format == "fp8_pv"
    if fp8_pv != (v_codes.dtype == torch.float8_e4m3fn):
        raise ValueError(f"compute_format {config.compute_format!r} needs V codes of the matching format, got {v_codes.dtype}")
    vc = v_codes.float().double().repeat_interleave(group, dim=1)
    ks = k_scales.repeat_interleave(group, dim=1)
    vs = v_scales.repeat_interleave(group, dim=1)
    qs_row = q_scales.repeat_interleave(bm, dim=-1)[..., :nq]  # [B, Hq, Nq]

    rows = torch.arange(nq, device=device)
    m_i = torch.full((b, hq, nq), float("-inf"), device=device)
    l_i = torch.zeros((b, hq, nq), device=device)
    acc = torch.zeros((b, hq, nq, d), device=device)
    for j, start in enumerate(range(0, nk, bn)):
        stop = min(start + bn, nk)
        s = _tile_scores(qc, qs_row, kc, ks, j, start, stop, rows, causal, nk - nq)
        m_tile = s.amax(dim=-1)
        m_new = torch.maximum(m_i, m_tile)
        m_ref = torch.maximum(m_tile, m_new - REF_MAX_CLAMP) if config.p_scale == "row" else m_new
        m_ref_safe = torch.where(torch.isfinite(m_ref), m_ref, torch.zeros_like(m_ref))
        x = s - m_ref_safe[..., None]
        p = sas_exp2(x) if config.use_sas else torch.exp2(x)
        if threshold is not None:
            p = torch.where(s > (m_new - threshold)[..., None], p, torch.zeros_like(p))
        alpha = torch.exp2(m_i - m_new)
        alpha = torch.where(torch.isfinite(m_new), alpha, torch.ones_like(alpha))
        r = torch.where(torch.isfinite(m_new), torch.exp2(m_ref_safe - m_new), torch.zeros_like(m_new))
        l_i = l_i * alpha + r * p.sum(dim=-1)
        p_codes = (p * 127.0).to(torch.float8_e4m3fn).float() if fp8_pv else torch.round(p * 127.0)
        pv = torch.matmul(p_codes.double(), vc[:, :, start:stop]).float()
        acc = acc * alpha[..., None] + pv * (r * vs[:, :, j, None] / 127.0)[..., None]
        m_i = m_new
    out = acc / l_i.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return torch.where((l_i > 0)[..., None], out, torch.zeros_like(out))


def _tile_scores(qc, qs_row, kc, ks, j: int, start: int, stop: int, rows, causal: bool, offset: int):
    """Scores of query rows `rows` (qc their codes in fp64, qs_row their Q-tile scales) against KV tile
    j, keys [start, stop) (kc, ks repeated over the query heads); causal: key <= row + offset, else -inf."""
    s = torch.matmul(qc, kc[:, :, start:stop].transpose(-1, -2)).float() * (qs_row * ks[:, :, j, None])[..., None]
    if causal:
        cols = torch.arange(start, stop, device=s.device)
        s = s.masked_fill(cols[None, :] > rows[:, None] + offset, float("-inf"))
    return s


def tile_row_maxima(qkv: QuantizedQKV, causal: bool, block_m: int, block_n: int):
    """In the prefill kernel's visiting order, for each Q tile of block_m rows the KV tiles of block_n
    keys up to the diagonal (all of them when not causal), yield (m_tile, m_new): each real row's tile
    maximum and running maximum including the tile, [B, Hq, rows] (Nq = Nk; scores as in
    `flashq_attention`)."""
    b, hq, nq, d = qkv.q_codes.shape
    group = hq // qkv.k_codes.shape[1]
    device = qkv.q_codes.device
    qs = qkv.q_scales.repeat_interleave(block_m, dim=-1)[..., :nq]
    kc = qkv.k_codes.double().repeat_interleave(group, dim=1)
    ks = qkv.k_scales.repeat_interleave(group, dim=1)
    for i0 in range(0, nq, block_m):
        rows = torch.arange(i0, min(i0 + block_m, nq), device=device)
        q_tile = qkv.q_codes[:, :, rows].double()
        m_i = torch.full((b, hq, rows.numel()), float("-inf"), device=device)
        hi = min(i0 + block_m, nq) if causal else nq
        for j, start in enumerate(range(0, hi, block_n)):
            s = _tile_scores(q_tile, qs[:, :, rows], kc, ks, j, start, min(start + block_n, nq), rows, causal, 0)
            m_tile = s.amax(-1)
            m_new = torch.maximum(m_i, m_tile)
            yield m_tile, m_new
            m_i = m_new


def threshold_tile_skips(qkv: QuantizedQKV, causal: bool, config: KernelConfig) -> tuple[int, int]:
    """(skipped, visited) KV tiles of the prefill kernel with config's sparsity threshold T.

    Over `tile_row_maxima`'s tiles, per (batch, query head), the kernel skips a tile in which no row
    has a score above m_new - T (the tile maximum decides, so the skip is exact; the kernel's own
    fp32 rounding can move a score that lies within ~1e-6 of the boundary). 0 skipped without a
    threshold.
    """
    return tile_skip_counts(qkv, causal, config.block_m, config.block_n, [config.sparsity_threshold])[0]


def tile_skip_counts(qkv: QuantizedQKV, causal: bool, block_m: int, block_n: int,
                     thresholds) -> list[tuple[int, int]]:
    """`threshold_tile_skips` for several thresholds (None: no threshold) from one pass over the scores."""
    b, hq = qkv.q_codes.shape[:2]
    skipped, visited = [0] * len(thresholds), 0
    for m_tile, m_new in tile_row_maxima(qkv, causal, block_m, block_n):
        visited += b * hq
        for i, t in enumerate(thresholds):
            if t is not None:
                skipped[i] += int((m_tile <= m_new - t).all(dim=-1).sum())
    return [(n, visited) for n in skipped]


def turbo_attention_reference(q, k, v, causal: bool = True, config: KernelConfig | None = None, sm_scale: float | None = None) -> torch.Tensor:
    """TurboAttention prefill numerics end to end: BPQ stage 1, then FlashQ attention with SAS.

    Same signature and layout as `kernels.turbo_attention`; returns fp32 [B, Hq, Nq, D].
    """
    check_qkv(q, k, v)
    check_bool("causal", causal)
    config = check_config(config) or KernelConfig()
    return flashq_attention(quantize_qkv(q, k, v, config, sm_scale), causal, config)


# ----------------------------------------------------------------------------- BPQ stage 2

class LowBit(NamedTuple):
    codes: torch.Tensor  # uint8 codes in [0, 2^bits - 1], shape of the input
    scale: torch.Tensor  # int16 integer scale >= 1, the input's shape with `dim` reduced to 1
    zero: torch.Tensor  # int16 zero point (the group minimum), same shape as scale


def _check_bits(bits) -> None:
    if bits not in (2, 4):
        raise ValueError(f"bits must be 2 or 4, got {bits!r}")


def quantize_lowbit(x_int8: torch.Tensor, bits: int, dim: int = -1, ties: str = "even") -> LowBit:
    """BPQ stage 2: INT8 codes to asymmetric `bits`-bit codes, one group per slice along `dim`.

    scale = max(1, ceil((max - min) / (2^bits - 1))), zero = min, both integers, and
    code = round((x - zero) / scale), so that dequantizing, code * scale + zero, is integer
    arithmetic and within scale/2 of x. ties "even" rounds a tie (even scale, x - zero =
    c * scale + scale / 2) to the even code, "up" rounds it up: with "up" the error has mean +1/2
    on the INT8 grid, a bias that long flat contexts do not average away (4-bit cache cosine 0.79
    instead of 0.99 at 32k tokens), so the cache uses "even".
    K groups are channels over a block of tokens (dim = token axis); V groups are channel
    groups of one token (dim = channel axis, after reshaping to [..., groups, group_size]).
    """
    check_tensor("x_int8", x_int8, dtypes=(torch.int8,))
    _check_bits(bits)
    if ties not in ("even", "up"):
        raise ValueError(f"ties must be 'even' or 'up', got {ties!r}")
    levels = (1 << bits) - 1
    x = x_int8.to(torch.int32)
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = torch.clamp(-torch.div(-(hi - lo), levels, rounding_mode="floor"), min=1)  # ceil division
    num = x - lo + scale // 2
    codes = torch.div(num, scale, rounding_mode="floor")
    if ties == "even":
        tie = (scale % 2 == 0) & (num == codes * scale) & (codes % 2 == 1)
        codes = codes - tie.to(torch.int32)
    codes = codes.clamp(0, levels)
    return LowBit(codes.to(torch.uint8), scale.to(torch.int16), lo.to(torch.int16))


def dequantize_lowbit(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """code * scale + zero as int32 (back on the INT8 grid; multiply by the stage-1 scale for floats)."""
    return codes.to(torch.int32) * scale.to(torch.int32) + zero.to(torch.int32)


def pack_lowbit(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `bits`-bit codes along the last dim into uint8 words, lowest bits first.

    [..., D] -> [..., D * bits / 8]; D must be a multiple of 8 / bits. Code i of a word sits at
    bit offset (i % (8/bits)) * bits.
    """
    check_tensor("codes", codes, dtypes=(torch.uint8,))
    _check_bits(bits)
    per_word = 8 // bits
    if codes.shape[-1] % per_word:
        raise ValueError(f"codes' last dim must be a multiple of {per_word} for {bits}-bit packing, got {codes.shape[-1]}")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"codes must be < {1 << bits} for {bits}-bit packing, got max {int(codes.max())}")
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per_word, per_word)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def unpack_lowbit(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_lowbit`: [..., W] uint8 -> [..., W * 8 / bits] uint8 codes."""
    check_tensor("packed", packed, dtypes=(torch.uint8,))
    _check_bits(bits)
    per_word = 8 // bits
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per_word).to(torch.uint8)


# ----------------------------------------------------------------------------- head-wise mixed precision

def head_priority(x: torch.Tensor) -> torch.Tensor:
    """Priority of each KV head: (max - min) * std of its values over batch, tokens and channels.

    x: [B, H, N, D] (K or V over the calibration window). Returns fp32 [H]. High gap and
    spread mean more quantization error at low bit width, so high priority keeps 4 bits.
    """
    check_tensor("x", x, ndim=4)
    h = x.shape[1]
    per_head = x.float().transpose(0, 1).reshape(h, -1)
    gap = per_head.amax(dim=1) - per_head.amin(dim=1)
    std = per_head.std(dim=1, unbiased=False)
    return gap * std


def num_low_bit_heads(num_heads: int, bit_mix: float) -> int:
    """How many of `num_heads` go to 2 bits for `bit_mix`: floor(bit_mix * H) (1e-9 slack for 0.5 * 2 etc.)."""
    if not 0.0 <= bit_mix <= 1.0:
        raise ValueError(f"bit_mix must be in [0, 1], got {bit_mix}")
    return int(math.floor(bit_mix * num_heads + 1e-9))


def assign_head_bits(priority: torch.Tensor, bit_mix: float) -> torch.Tensor:
    """Bits per head: the floor(bit_mix * H) lowest-priority heads get 2, the rest 4 (ties: lower index first)."""
    check_tensor("priority", priority, ndim=1)
    if isinstance(bit_mix, bool) or not isinstance(bit_mix, (int, float)):
        raise TypeError(f"bit_mix must be a float in [0, 1], got {bit_mix!r}")
    n_low = num_low_bit_heads(priority.numel(), float(bit_mix))
    order = torch.sort(priority.float().cpu(), stable=True).indices
    bits = torch.full((priority.numel(),), 4, dtype=torch.int32)
    bits[order[:n_low]] = 2
    return bits.to(priority.device)


# ----------------------------------------------------------------------------- error metrics

class AttentionError(NamedTuple):
    cosine: float
    rel_l1: float
    sqnr_db: float
    max_abs: float


def attention_error(out: torch.Tensor, ref: torch.Tensor) -> AttentionError:
    """Cosine similarity, relative L1, SQNR (dB) and max abs error of `out` against `ref` (fp32)."""
    check_tensor("out", out)
    check_tensor("ref", ref)
    if out.shape != ref.shape:
        raise ValueError(f"out and ref must have one shape, got {tuple(out.shape)} and {tuple(ref.shape)}")
    o = out.double().flatten()
    r = ref.double().flatten()
    err = o - r
    cosine = float(torch.dot(o, r) / (o.norm() * r.norm()).clamp_min(1e-300))
    rel_l1 = float(err.abs().sum() / r.abs().sum().clamp_min(1e-300))
    sqnr = float(10.0 * torch.log10((r.pow(2).sum() / err.pow(2).sum().clamp_min(1e-300)).clamp_min(1e-300)))
    return AttentionError(cosine, rel_l1, sqnr, float(err.abs().max()) if err.numel() else 0.0)


def outlier_qkv(b: int, hq: int, hkv: int, n: int, d: int, dtype=torch.float16, device="cpu", seed: int = 0,
                outlier_channels: int = 4, outlier_scale: tuple[float, float] = (10.0, 20.0)):
    """Random q, k, v with LLM-like outlier key channels (a few channels scaled 10-20x, plus a shared offset)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=gen)
    k = torch.randn(b, hkv, n, d, generator=gen)
    v = torch.randn(b, hkv, n, d, generator=gen)
    channels = torch.randperm(d, generator=gen)[:outlier_channels]
    lo, hi = outlier_scale
    factors = lo + (hi - lo) * torch.rand(outlier_channels, generator=gen)
    k[..., channels] = k[..., channels] * factors + factors  # scaled and offset, as real keys are
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def sink_qkv(b: int, hq: int, hkv: int, n: int, d: int, dtype=torch.float16, device="cpu", seed: int = 0,
             live_tiles=((0, 32), (128, 160))) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse attention: keys in the `live_tiles` row ranges (an attention sink at the start, and
    retrieved spans) share one direction with every query, scoring ~26 octaves (log2 units, after
    sm_scale = 1/sqrt(d)) above the other keys, which are small noise. With a sparsity threshold
    of a few octaves every other KV tile drops all its scores (SAS skips it)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    amp = 12.0 * (d / 64) ** 0.25  # u.u * amp^2 / sqrt(d) the same at every head dim
    q = amp * u + 0.3 * torch.randn(b, hq, n, d, generator=g)
    k = 0.3 * torch.randn(b, hkv, n, d, generator=g)
    for lo, hi in live_tiles:
        k[:, :, lo:hi] += amp * u
    v = torch.randn(b, hkv, n, d, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


# ---- KV cache and decode
#
# The cache format of `kernels.cache.TurboKVCache`, in plain torch, and the decode attention that
# reads it. Per (sequence b, KV head h) the prompt and every later flush are cut into blocks of n_b
# tokens (KernelConfig.buffer_tokens):
#   BPQ stage 1: symmetric INT8 per block ([n_b, D] tile): s1 = max|x| / 127 (fp32), as
#     `quantize_int8_blocks(x, n_b)`. K is smoothed first (K - mu, mu its per-channel mean over the
#     prompt), which softmax cancels for every query.
#   BPQ stage 2 (`quantize_lowbit_even`: quantize_lowbit's integers, ties to even): K per channel
#     over the block's n_b tokens, V per token over groups of v_group channels (the last group may
#     be partial), 4 or 2 bits, integer scale and zero point stored as int8 (scale <= ceil(254 / 3)
#     = 85, zero = group minimum in [-127, 127]).
#   Packing ("planar"): a token row of D codes becomes W = D * bits / 8 bytes; byte w holds the codes
#     of channels w, w + W, w + 2W, ... at bit offsets 0, bits, 2 bits, ... (lowest bits first), so
#     that a kernel unpacks plane i (channels [i W, (i + 1) W)) of a whole tile with one shift and
#     one mask.
# The tokens after the last full block stay in an fp16/bf16 residual buffer (raw K, not smoothed).
# Decode scores are q' . (k - mu) with q' = q * sm_scale * log2(e): for a packed block,
#   s_t = s1 * (sum_d (q'_d * scale_d) code_{t,d} + sum_d q'_d * zero_d)
# and for the buffer q' . k - q' . mu; then a base-2 softmax, and o = sum_t p_t v_t / sum_t p_t with
# v_t = s1 * (code_{t,d} * scale_{t,g(d)} + zero_{t,g(d)}) for packed tokens.

class PackedKV(NamedTuple):
    """One pool of KV heads stored at one bit width (`bits`); Hp heads, NBLK blocks of n_b tokens."""

    k_codes: torch.Tensor  # uint8 [B, Hp, NBLK, n_b, D * bits / 8], planar packing
    k_scale: torch.Tensor  # int8 [B, Hp, NBLK, D] (per channel over the block)
    k_zero: torch.Tensor  # int8 [B, Hp, NBLK, D]
    v_codes: torch.Tensor  # uint8 [B, Hp, NBLK, n_b, D * bits / 8]
    v_scale: torch.Tensor  # int8 [B, Hp, NBLK, n_b, NG] (per token over channel groups)
    v_zero: torch.Tensor  # int8 [B, Hp, NBLK, n_b, NG]


class KVCacheContents(NamedTuple):
    """Everything a TurboKVCache holds (what `TurboKVCache.contents()` returns)."""

    pool4: PackedKV  # the 4-bit heads, indexed by head_slot
    pool2: PackedKV  # the 2-bit heads
    head_bits: torch.Tensor  # int32 [Hkv], 4 or 2
    head_slot: torch.Tensor  # int32 [Hkv], index of the head in its pool
    k_s1: torch.Tensor  # fp32 [B, Hkv, NBLK] stage-1 scales
    v_s1: torch.Tensor  # fp32 [B, Hkv, NBLK]
    k_mean: torch.Tensor  # fp32 [B, Hkv, D] smoothing mean (zeros when smoothing is off)
    k_buffer: torch.Tensor  # [B, Hkv, n_b, D] residual tokens, cache dtype, raw K
    v_buffer: torch.Tensor  # [B, Hkv, n_b, D]
    lengths: torch.Tensor  # int32 [B] tokens held per sequence (packed = lengths // n_b blocks)
    block_tokens: int  # n_b
    v_group: int


def num_v_groups(d: int, v_group: int) -> int:
    """V quantization groups per token: ceil(D / v_group) (the last one partial when D % v_group)."""
    return -(-d // v_group)


def head_slots(head_bits) -> list[int]:
    """Index of each KV head in the pool of its bit width (heads of one width numbered in order)."""
    counts = {4: 0, 2: 0}
    slots = []
    for bits in head_bits:
        slots.append(counts[bits])
        counts[bits] += 1
    return slots


def empty_packed_kv(batch: int, heads: int, num_blocks: int, block: int, d: int, bits: int, v_group: int,
                    device=None) -> PackedKV:
    """A zeroed pool of `heads` KV heads at `bits` ([B, Hp, NBLK, ...] as PackedKV lays it out)."""
    w = d * bits // 8
    ng = num_v_groups(d, v_group)
    z = dict(device=device)
    return PackedKV(torch.zeros(batch, heads, num_blocks, block, w, dtype=torch.uint8, **z),
                    torch.zeros(batch, heads, num_blocks, d, dtype=torch.int8, **z),
                    torch.zeros(batch, heads, num_blocks, d, dtype=torch.int8, **z),
                    torch.zeros(batch, heads, num_blocks, block, w, dtype=torch.uint8, **z),
                    torch.zeros(batch, heads, num_blocks, block, ng, dtype=torch.int8, **z),
                    torch.zeros(batch, heads, num_blocks, block, ng, dtype=torch.int8, **z))


def pack_lowbit_planar(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D] codes -> [..., W] bytes, W = D * bits / 8; byte w holds channels w + i W at bit i * bits."""
    check_tensor("codes", codes, dtypes=(torch.uint8,))
    _check_bits(bits)
    per_word = 8 // bits
    d = codes.shape[-1]
    if d % per_word:
        raise ValueError(f"codes' last dim must be a multiple of {per_word} for {bits}-bit packing, got {d}")
    planes = codes.to(torch.int32).reshape(*codes.shape[:-1], per_word, d // per_word)
    shifts = (torch.arange(per_word, device=codes.device, dtype=torch.int32) * bits)[:, None]
    return (planes << shifts).sum(dim=-2).to(torch.uint8)


def unpack_lowbit_planar(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_lowbit_planar`: [..., W] bytes -> [..., W * 8 / bits] codes."""
    check_tensor("packed", packed, dtypes=(torch.uint8,))
    _check_bits(bits)
    per_word = 8 // bits
    shifts = (torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits)[:, None]
    planes = (packed.to(torch.int32)[..., None, :] >> shifts) & ((1 << bits) - 1)
    return planes.reshape(*packed.shape[:-1], packed.shape[-1] * per_word).to(torch.uint8)


def quantize_lowbit_even(x_int8: torch.Tensor, bits: int, dim: int = -1) -> LowBit:
    """`quantize_lowbit` with ties to even (the cache's rounding; kept as a name for its callers)."""
    return quantize_lowbit(x_int8, bits, dim, ties="even")


def kv_smoothing_mean(k: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of K over each sequence's first lengths[b] tokens: fp32 [B, H, D] (0 if empty).

    Summed in fp32 straight from K's dtype, one sequence at a time (no fp32 copy of K).
    """
    b, h, _, d = k.shape
    out = torch.zeros(b, h, d, device=k.device, dtype=torch.float32)
    for i, n in enumerate(lengths.tolist()):
        if n > 0:
            out[i] = k[i, :, :n].sum(dim=1, dtype=torch.float32) / n
    return out


def kv_head_priority(k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, k_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Priority of each KV head for bit assignment: head_priority(K) + head_priority(V), each
    divided by its mean over heads (so that K's outlier channels do not drown V's ranking), over
    the valid tokens of every sequence; K minus k_mean [B, H, D] when given (the K the cache
    quantizes). Returns fp32 [H] (zeros if no token is valid). Computed one head at a time to
    bound the fp32 temporaries.
    """
    h = k.shape[1]
    lens = lengths.tolist()
    total = torch.zeros(h, dtype=torch.float32, device=k.device)
    if sum(lens) == 0:
        return total
    for x, shift in ((k, k_mean), (v, None)):
        pr = torch.empty(h, dtype=torch.float32, device=k.device)
        for j in range(h):
            rows = torch.cat([x[i, j, :n].float() - (0.0 if shift is None else shift[i, j].float())
                              for i, n in enumerate(lens) if n > 0], dim=0)
            pr[j] = head_priority(rows[None, None])[0]
        mean = pr.mean()
        total += pr / mean if float(mean) > 0 else pr
    return total


def quantize_kv_blocks(k: torch.Tensor, v: torch.Tensor, bits: int, block: int, v_group: int):
    """BPQ stages 1 and 2 of whole blocks: k, v float [B, H, NBLK * block, D] (K already smoothed).

    Returns (PackedKV with H heads, k_s1 [B, H, NBLK], v_s1 [B, H, NBLK]).
    """
    _check_bits(bits)
    b, h, n, d = k.shape
    if n % block:
        raise ValueError(f"quantize_kv_blocks takes whole blocks of {block} tokens, got {n}")
    nblk = n // block
    k8, k_s1 = quantize_int8_blocks(k, block)
    v8, v_s1 = quantize_int8_blocks(v, block)
    kq = quantize_lowbit_even(k8.view(b, h, nblk, block, d), bits, dim=-2)  # per channel over the block
    v8 = v8.view(b, h, nblk, block, d)
    v_codes, v_scale, v_zero = [], [], []
    for g0 in range(0, d, v_group):  # per token over channel groups
        vq = quantize_lowbit_even(v8[..., g0:g0 + v_group].contiguous(), bits, dim=-1)
        v_codes.append(vq.codes)
        v_scale.append(vq.scale)
        v_zero.append(vq.zero)
    pool = PackedKV(
        pack_lowbit_planar(kq.codes, bits), kq.scale[..., 0, :].to(torch.int8), kq.zero[..., 0, :].to(torch.int8),
        pack_lowbit_planar(torch.cat(v_codes, dim=-1), bits),
        torch.cat(v_scale, dim=-1).to(torch.int8), torch.cat(v_zero, dim=-1).to(torch.int8))
    return pool, k_s1, v_s1


def dequantize_kv_blocks(pool: PackedKV, bits: int, v_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The INT8-grid values of a pool, as int32 [B, Hp, NBLK, n_b, D]: code * scale + zero for K and V
    (multiply by the stage-1 scale of the block for floats)."""
    k_codes = unpack_lowbit_planar(pool.k_codes, bits)
    v_codes = unpack_lowbit_planar(pool.v_codes, bits)
    d = k_codes.shape[-1]
    k_int = dequantize_lowbit(k_codes, pool.k_scale[..., None, :], pool.k_zero[..., None, :])
    group_of = torch.arange(d, device=k_codes.device) // v_group
    v_int = dequantize_lowbit(v_codes, pool.v_scale[..., group_of], pool.v_zero[..., group_of])
    return k_int, v_int


def quantize_kv_cache(k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, head_bits: torch.Tensor,
                      block: int, v_group: int, smooth: bool, max_len: int | None = None,
                      k_mean: torch.Tensor | None = None) -> KVCacheContents:
    """What `TurboKVCache.prefill` stores, in plain torch: k, v [B, H, N, D]; lengths int [B];
    head_bits [H] of 4/2. Pools hold max_len // block blocks (default N // block). With smooth, K
    is smoothed by k_mean [B, H, D] if given (a cache that decoded past its prompt keeps the
    prompt's mean), else by the mean over each sequence's lengths[b] tokens."""
    b, h, n, d = k.shape
    max_len = n if max_len is None else max_len
    nblk = max_len // block
    lens = lengths.to(torch.int64).cpu()
    if not smooth:
        mean = torch.zeros(b, h, d, device=k.device)
    elif k_mean is not None:
        mean = k_mean.float().to(k.device)
    else:
        mean = kv_smoothing_mean(k, lens).to(k.device)
    bits_list = [int(x) for x in head_bits.tolist()]
    slot = head_slots(bits_list)
    pools = {bt: empty_packed_kv(b, bits_list.count(bt), nblk, block, d, bt, v_group, k.device) for bt in (4, 2)}
    k_s1 = torch.zeros(b, h, nblk, device=k.device)
    v_s1 = torch.zeros(b, h, nblk, device=k.device)
    k_buf = torch.zeros(b, h, block, d, device=k.device, dtype=k.dtype)
    v_buf = torch.zeros(b, h, block, d, device=k.device, dtype=v.dtype)
    for i, length in enumerate(lens.tolist()):
        full = length // block
        rest = length - full * block
        if full:
            ks = k[i:i + 1, :, :full * block].float() - mean[i:i + 1, :, None, :]
            vs = v[i:i + 1, :, :full * block].float()
            for j, bt in enumerate(bits_list):
                pool, s1k, s1v = quantize_kv_blocks(ks[:, j:j + 1], vs[:, j:j + 1], bt, block, v_group)
                for dst, src in zip(pools[bt], pool):
                    dst[i, slot[j], :full] = src[0, 0]
                k_s1[i, j, :full] = s1k[0, 0]
                v_s1[i, j, :full] = s1v[0, 0]
        if rest:
            k_buf[i, :, :rest] = k[i, :, full * block:length]
            v_buf[i, :, :rest] = v[i, :, full * block:length]
    return KVCacheContents(pools[4], pools[2], torch.tensor(bits_list, dtype=torch.int32, device=k.device),
                           torch.tensor(slot, dtype=torch.int32, device=k.device), k_s1, v_s1, mean, k_buf, v_buf,
                           lens.to(torch.int32).to(k.device), block, v_group)


def dequantize_kv_cache(c: KVCacheContents) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K (smoothed, i.e. minus mu) and V the decode attends to, fp64 [B, Hkv, max(lengths), D],
    and the lengths [B] (tokens past a sequence's length are zero)."""
    b, h, nb, d = c.k_buffer.shape
    lens = [int(x) for x in c.lengths.tolist()]
    n_max = max(lens) if lens else 0
    k_out = torch.zeros(b, h, n_max, d, dtype=torch.float64, device=c.k_buffer.device)
    v_out = torch.zeros_like(k_out)
    deq = {}
    for bits, pool in ((4, c.pool4), (2, c.pool2)):
        if pool.k_codes.shape[1]:
            deq[bits] = dequantize_kv_blocks(pool, bits, c.v_group)
    for j in range(h):
        bits, slot = int(c.head_bits[j]), int(c.head_slot[j])
        for i, length in enumerate(lens):
            full = length // nb
            rest = length - full * nb
            if full:
                k_int, v_int = deq[bits][0][i, slot, :full], deq[bits][1][i, slot, :full]
                k_out[i, j, :full * nb] = (k_int.double() * c.k_s1[i, j, :full, None, None].double()).reshape(-1, d)
                v_out[i, j, :full * nb] = (v_int.double() * c.v_s1[i, j, :full, None, None].double()).reshape(-1, d)
            if rest:
                k_out[i, j, full * nb:length] = c.k_buffer[i, j, :rest].double() - c.k_mean[i, j].double()
                v_out[i, j, full * nb:length] = c.v_buffer[i, j, :rest].double()
    return k_out, v_out, torch.tensor(lens, dtype=torch.int64)


def _quantized_score_correction(qf: torch.Tensor, c: KVCacheContents, n_max: int, score_bits: int) -> torch.Tensor:
    """s(INT8 scores) - s(exact q') over the packed tokens, fp64 [B, Hq, n_max] (0 on buffer tokens).

    The INT8-score decode kernel takes, per query head and packed block, a = q' * kscale (fp32), its
    per-row amax over the channels, and a_hat = amax / 127 * round(a * 127 / amax) (score_bits 8),
    or with the residual rounded to 1/254 of a step added (16); the block's scores are then
    s1k * (a_hat . code + q' . kzero), i.e. the exact scores plus s1k * (a_hat - a) . code.
    Rounding is to nearest, ties to even (the kernel's magic-number rounding).
    """
    b, hq, d = qf.shape
    h, nb = c.k_buffer.shape[1], c.block_tokens
    group = hq // h
    lens = [int(x) for x in c.lengths.tolist()]
    corr = torch.zeros(b, hq, n_max, dtype=torch.float64, device=qf.device)
    for j in range(h):
        bits, slot = int(c.head_bits[j]), int(c.head_slot[j])
        pool = c.pool4 if bits == 4 else c.pool2
        codes = unpack_lowbit_planar(pool.k_codes[:, slot:slot + 1], bits)[:, 0].double()  # [B, NBLK, nb, D]
        for i, length in enumerate(lens):
            full = length // nb
            if not full:
                continue
            a = qf[i, j * group:(j + 1) * group, None, :] * pool.k_scale[i, slot, None, :full].float()  # [G, full, D]
            amax = a.abs().amax(dim=-1, keepdim=True)
            inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
            y = a * inv
            hi = torch.round(y)
            steps = hi + torch.round((y - hi) * 254.0) / 254.0 if score_bits == 16 else hi
            err = steps.double() * (amax.double() / 127.0) - a.double()  # [G, full, D]
            delta = torch.einsum("gfd,ftd->gft", err, codes[i, :full]) * c.k_s1[i, j, None, :full, None].double()
            corr[i, j * group:(j + 1) * group, :full * nb] = delta.reshape(group, full * nb)
    return corr


def decode_attention_reference(q: torch.Tensor, contents: KVCacheContents, sm_scale: float | None = None,
                               score_bits: int | None = None) -> torch.Tensor:
    """One decode step over a cache's contents, the arithmetic of the decode kernel in fp64.

    q: [B, Hq, 1, D], Hq a multiple of the cache's Hkv. q' = q * (sm_scale * log2 e) in fp32 (as
    the kernel folds it), scores s = q' . (k - mu) over each sequence's lengths[b] tokens
    (`dequantize_kv_cache`), o = sum 2^(s - max s) v / sum 2^(s - max s). A sequence of length 0
    gives 0. score_bits 8 or 16: the packed tokens' scores as the INT8-score kernel computes them
    (`_quantized_score_correction`; TurboKVCache.decode_score_bits says which). Returns fp32
    [B, Hq, 1, D].
    """
    check_tensor("q", q, ndim=4)
    check_sm_scale(sm_scale)
    if score_bits not in (None, 8, 16):
        raise ValueError(f"score_bits must be None, 8 or 16, got {score_bits!r}")
    b, hq, nq, d = q.shape
    k, v, lens = dequantize_kv_cache(contents)
    hkv = k.shape[1]
    if nq != 1 or hq % hkv:
        raise ValueError(f"q must be [B, Hq, 1, D] with Hq a multiple of {hkv}, got {tuple(q.shape)}")
    group = hq // hkv
    qf = fold_softmax_scale(q, sm_scale).double()
    kr = k.repeat_interleave(group, dim=1)
    vr = v.repeat_interleave(group, dim=1)
    s = torch.matmul(qf, kr.transpose(-1, -2))  # [B, Hq, 1, Nmax], log2 units
    if score_bits is not None:
        s = s + _quantized_score_correction(fold_softmax_scale(q, sm_scale)[:, :, 0].float(), contents, s.shape[-1],
                                            score_bits)[:, :, None, :]
    valid = torch.arange(k.shape[2])[None, :] < lens[:, None]
    s = s.masked_fill(~valid.to(s.device)[:, None, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp2(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, vr) / denom.clamp_min(1e-300)
    return torch.where(denom > 0, out, torch.zeros_like(out)).float()
