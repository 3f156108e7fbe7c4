"""KV-cache kernels in Triton: BPQ block quantization (prefill and flush), append, split-KV decode.

The cache format is `kernels.reference`'s "KV cache and decode" section (the ground truth):
per (sequence, KV head), blocks of n_b tokens with a stage-1 INT8 scale s1 per block (symmetric
over the [n_b, D] tile) and stage-2 4- or 2-bit codes with int8 scale and zero point (K per channel
over the block, V per token over groups of v_group channels), packed "planar" (byte w of a token
row holds channels w, w + W, ... with W = D * bits / 8); the last n_b or fewer tokens stay in an
fp16/bf16 residual buffer. The paper calls the format BPQ (stage 2 with head-wise mixed precision).

Kernels:
- `_quantize_blocks_kernel`: one program per (block, sequence x KV head). PREFILL: block j of the
  prompt goes to the head's pool (4-bit or 2-bit), the partial last block to the buffer. FLUSH:
  a sequence whose buffer just filled (lengths + 1 a multiple of n_b) moves it into its next block.
  Planar packing is a product with a 0/2^k selection matrix (exact in fp16 x fp16 -> fp32).
- `_append_kernel`: writes the new token's k, v into the buffer slot lengths[b] % n_b (only on a
  step that flushes; otherwise the split kernel's buffer program appends it).
- `_decode_split_kernel` (flash-decoding): program (split s, sequence x KV head) runs an online
  base-2 softmax over its share of the packed tiles of BLOCK_N tokens, or (s == S) over the
  buffer, for all G = Hq / Hkv query heads of the KV head at once (each KV tile loaded once), and
  writes partial (max m, sum l, acc). Packed tiles take one of two paths:
  `_packed_split_i8` (FlashQ's decode) when G x NG <= 16 (NG = V groups; llama3-8b 4 x 4, phi3-mini
  1 x 3): rows r = (query head, V group); scores are INT8 tensor-core products of the raw codes
  with q' * kscale quantized per row and block (one INT8 operand, or hi + lo / 254 with
  config.decode_q_split or fp32 q), and V's scales are folded into P per row's group, so no
  element is dequantized at all; `_packed_split` otherwise (qwen2.5-7b's 7 x 4 rows would double
  the tile), with fp16 products on dequantized values:
      s   = s1k * (sum_d (q'_d * kscale_d) code_d + sum_d q'_d * kzero_d)
      acc = acc * 2^(m - m_new) + s1v * p . (vcode * vscale + vzero)      (dequantized in registers)
  plane by plane (byte w of a token row holds channels w + i W): each byte is loaded once and its
  nibbles / crumbs become exact fp16 codes (CUDA: inline asm, ~1.5 instructions per code).
  The fp32 operands of the tensor-core products are split hi + lo in fp16 (two products): always
  q' * kscale (scores feed exp2), and p when q is fp32, so the kernel keeps ~fp32 accuracy there;
  with fp16/bf16 q (output rounded to 2^-11 / 2^-8 anyway) p goes in as one fp16 operand (relative
  error 2^-12 per probability, one product). Codes and dequantized INT8 values are exact in fp16.
  Nothing dequantized is ever written to memory. For D = 64 and 128 (a plane is a power of two
  wide) the tile needs no masks and V's per-group scales are broadcast from a [BLOCK_N, NG]
  tile; for D = 80 and 96 each plane selects among its (at most three) groups' scales.
- `_decode_reduce_kernel`: program per (sequence, query head): o = sum_s 2^(m_s - M) acc_s /
  sum_s 2^(m_s - M) l_s; with COMMIT it also advances lengths[b] (so a decode step needs
  no host synchronisation).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sas import MAGIC_F, MAGIC_I, int_to_float_exact

QUANT_NUM_WARPS = 8  # block quantization, one [n_b, D] tile of K or V per program (H100: 8 warps ~10% faster than 4)
APPEND_NUM_WARPS = 1
REDUCE_NUM_WARPS = 4
REDUCE_TILE_ELEMS = 8192  # [CHUNK, D] partials combined per step of the reduction loop (fp32 registers)
MIN_TILES_PER_SPLIT = 4  # a split shorter than this costs more in setup and partials than it saves
TILES_PER_SPLIT = 16  # splits of about this many tiles amortize a program's fixed cost (H100 sweep)
WAVES = 2  # programs per SM the split heuristic aims for
# The INT8-score decode (`_packed_split_i8`) runs one row per (query head, V group) pair; it is used
# when they fit one 16-row tensor-core tile (llama3-8b: 4 heads x 4 groups). With more (qwen2.5-7b:
# 7 x 4) the doubled tile made it slower on the H100 than `_packed_split`, which is used instead.
FOLDED_ROWS = 16
INTERPRETER_SMS = 4  # no GPU: the interpreter runs programs one after another, so fewer is faster
F16_MAGIC_CODE = tl.constexpr(0x6400)  # bits of fp16 1024.0: (0x6400 | c) is 1024 + c for 0 <= c < 1024
F16_MAGIC_INT = tl.constexpr(0x6600)  # bits of fp16 1536.0: 0x6600 + x is 1536 + x for -512 <= x < 512


# ----------------------------------------------------------------------------- heuristics

def decode_tile_tokens(decode_block_n: int, block_tokens: int) -> int:
    """Tokens per decode tile: the largest power of two <= decode_block_n that divides n_b.

    A tile never straddles two quantization blocks, so its K scales and stage-1 scales are one
    per tile. n_b is a multiple of 16 (KernelConfig), so the tile has at least 16 tokens.
    """
    tile = 1 << (max(16, decode_block_n).bit_length() - 1)
    while block_tokens % tile:
        tile //= 2
    return max(tile, 16)


def decode_num_splits(max_tiles: int, batch_heads: int, num_sms: int, num_splits: int | None = None) -> int:
    """Partitions of the packed context per (sequence, KV head) for the split-KV decode.

    max_tiles: packed tiles of the longest sequence; batch_heads: B * Hkv programs per split.
    num_splits (the config's) wins when given, capped at max_tiles. Otherwise enough splits for
    WAVES programs per SM, or for TILES_PER_SPLIT tiles per split when that gives more (a program
    has a fixed cost: its query, the buffer, its partial; measured on the H100 at 32k context, about
    16 tiles of 64 tokens per program was fastest at every batch), but at least MIN_TILES_PER_SPLIT
    tiles per split. 0 when no tile is packed (only the buffer program runs).
    """
    if max_tiles <= 0:
        return 0
    if num_splits is not None:
        return max(1, min(num_splits, max_tiles))
    want = max(triton.cdiv(WAVES * num_sms, max(1, batch_heads)), max_tiles // TILES_PER_SPLIT)
    most = max(1, max_tiles // MIN_TILES_PER_SPLIT)
    return max(1, min(want, most))


# ----------------------------------------------------------------------------- block quantization

@triton.jit
def _stage1_int8(x, mask):
    """Symmetric INT8 over the whole tile (masked entries 0): codes int32 in [-127, 127] and s1."""
    x = tl.where(mask, x, 0.0)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    one = tl.zeros_like(amax) + 1.0
    # the reference's `127.0 / amax` is torch's __rtruediv__, i.e. reciprocal(amax) * 127, each
    # correctly rounded; div_rn because Triton's plain fp32 `/` is approximate on the GPU
    inv = tl.where(amax > 0, tl.math.div_rn(one, tl.maximum(amax, 1e-30)) * 127.0, 0.0)
    y = x * inv
    # round half away from zero; |y| <= 127 (1 + 2^-22) < 127.5, so the codes are in [-127, 127]
    codes = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int32)
    return codes, tl.math.div_rn(amax, one * 127.0)


@triton.jit
def _lowbit(x, lo, scale, inv_scale, LEVELS: tl.constexpr):
    """Stage 2 (reference.quantize_lowbit_even): round((x - lo) / scale), ties to the even code,
    clamped to [0, LEVELS]; int32, x - lo + scale // 2 >= 0 wherever the code is used.

    The integer quotient floor(num / scale) comes from fp32: num <= 127 + 127 + 127 and
    1 <= scale <= 254, so num * inv_scale (inv_scale = 1 / scale, within 2 ulp) is within 1e-4 of
    the exact quotient, while a quotient that is not an integer is at least 1 / 254 from one:
    adding 2^-9 and truncating gives the exact floor (an integer division costs ~20 instructions).
    """
    num = x - lo + (scale >> 1)
    code = (num.to(tl.float32) * inv_scale + 0.001953125).to(tl.int32)
    tie = ((scale & 1) == 0) & (num == code * scale) & ((code & 1) == 1)
    code = code - tie.to(tl.int32)
    return tl.minimum(tl.maximum(code, 0), LEVELS)


@triton.jit
def _pack_planar(codes, D: tl.constexpr, DP: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BITS: tl.constexpr):
    """[T, DP] codes -> [T, WP] words: word w = sum_i code[w + i W] << (i BITS), as one exact product."""
    offs_d = tl.arange(0, DP)
    offs_w = tl.arange(0, WP)
    plane = offs_d // W
    sel = (offs_d[:, None] < D) & ((offs_d - plane * W)[:, None] == offs_w[None, :])
    weight = tl.where(sel, (1 << (plane * BITS))[:, None], 0).to(tl.float16)
    words = tl.dot(codes.to(tl.float16), weight, out_dtype=tl.float32)
    return words.to(tl.int32).to(tl.uint8)


@triton.jit
def _quantize_tile(x, tmask, C, SC, Z, S1, pool_blk, s1_off,
                   NB: tl.constexpr, NBP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                   VG: tl.constexpr, NG: tl.constexpr, BITS: tl.constexpr, IS_V: tl.constexpr):
    """BPQ stages 1 + 2 of one block of K (already smoothed) or, IS_V, of V into pool block
    `pool_blk` (int64): codes C, scales SC, zero points Z, stage-1 scale S1[s1_off]."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    W: tl.constexpr = D * BITS // 8
    WP: tl.constexpr = max(16, triton.next_power_of_2(W))
    VGK: tl.constexpr = min(VG, DP)
    NGP: tl.constexpr = DP // VGK
    offs_t = tl.arange(0, NBP)
    offs_d = tl.arange(0, DP)
    offs_w = tl.arange(0, WP)
    dmask = offs_d < D
    mask = tmask[:, None] & dmask[None, :]
    x8, s1 = _stage1_int8(x, mask)
    if IS_V:
        # stage 2 per token over groups of VG channels (the last may be partial)
        x3 = tl.reshape(x8, (NBP, NGP, VGK))
        chan3 = tl.arange(0, NGP)[None, :, None] * VGK + tl.arange(0, VGK)[None, None, :]
        valid3 = chan3 < D
        lo = tl.min(tl.where(valid3, x3, 127), axis=2)
        hi = tl.max(tl.where(valid3, x3, -127), axis=2)
        scale = tl.maximum((hi - lo + LEVELS - 1) // LEVELS, 1)
        code3 = _lowbit(x3, lo[:, :, None], scale[:, :, None], (1.0 / scale.to(tl.float32))[:, :, None], LEVELS)
        code = tl.reshape(code3, (NBP, DP))
        offs_g = tl.arange(0, NGP)
        gmask = tmask[:, None] & (offs_g[None, :] < NG)
        g_ptrs = (pool_blk * NB + offs_t[:, None]) * NG + offs_g[None, :]
        tl.store(SC + g_ptrs, scale.to(tl.int8), mask=gmask)
        tl.store(Z + g_ptrs, lo.to(tl.int8), mask=gmask)
    else:
        # stage 2 per channel over the block's tokens
        lo = tl.min(tl.where(tmask[:, None], x8, 127), axis=0)
        hi = tl.max(tl.where(tmask[:, None], x8, -127), axis=0)
        scale = tl.maximum((hi - lo + LEVELS - 1) // LEVELS, 1)
        code = _lowbit(x8, lo[None, :], scale[None, :], (1.0 / scale.to(tl.float32))[None, :], LEVELS)
        tl.store(SC + pool_blk * D + offs_d, scale.to(tl.int8), mask=dmask)
        tl.store(Z + pool_blk * D + offs_d, lo.to(tl.int8), mask=dmask)
    words = _pack_planar(code, D, DP, W, WP, BITS)
    wmask = tmask[:, None] & (offs_w[None, :] < W)
    tl.store(C + pool_blk * (NB * W) + offs_t[:, None] * W + offs_w[None, :], words, mask=wmask)
    tl.store(S1 + s1_off, s1)


@triton.jit
def _pool_block(src, stride_n, blk, b, h, pid_bh, MEAN, HEAD_BITS, HEAD_SLOT, C4, SC4, Z4, C2, SC2, Z2, S1, H4, H2, NBLK,
                D: tl.constexpr, DP: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr,
                VG: tl.constexpr, NG: tl.constexpr, HAS_MEAN: tl.constexpr, IS_V: tl.constexpr):
    """The NB rows of K (or, IS_V, of V) at src (sequence b, KV head h) -> block `blk` of the head's
    pool (K minus the smoothing mean when HAS_MEAN), with its stage-1 scale. K and V are separate
    calls (separate programs in the prefill: half the registers each, twice the occupancy)."""
    offs_t = tl.arange(0, NBP)
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    tmask = offs_t < NB
    mask = tmask[:, None] & dmask[None, :]
    x = tl.load(src + offs_t[:, None].to(tl.int64) * stride_n + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_MEAN and not IS_V:
        x = x - tl.load(MEAN + pid_bh.to(tl.int64) * D + offs_d, mask=dmask, other=0.0)[None, :]
    bits = tl.load(HEAD_BITS + h)
    slot = tl.load(HEAD_SLOT + h)
    s1_off = pid_bh.to(tl.int64) * NBLK + blk
    if bits == 4:
        pool_blk = (b.to(tl.int64) * H4 + slot) * NBLK + blk
        _quantize_tile(x, tmask, C4, SC4, Z4, S1, pool_blk, s1_off, NB, NBP, D, DP, VG, NG, 4, IS_V)
    else:
        pool_blk = (b.to(tl.int64) * H2 + slot) * NBLK + blk
        _quantize_tile(x, tmask, C2, SC2, Z2, S1, pool_blk, s1_off, NB, NBP, D, DP, VG, NG, 2, IS_V)


@triton.jit
def _buffer_rows(src_k, src_v, stride_kn, stride_vn, rest, pid_bh, KBUF, VBUF,
                 D: tl.constexpr, DP: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr):
    """The first `rest` (< NB) rows at src_k / src_v -> the residual buffer of (sequence, head) pid_bh."""
    offs_t = tl.arange(0, NBP)
    offs_d = tl.arange(0, DP)
    mask = (offs_t < rest)[:, None] & (offs_d < D)[None, :]
    rows = offs_t[:, None].to(tl.int64)
    k = tl.load(src_k + rows * stride_kn + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(src_v + rows * stride_vn + offs_d[None, :], mask=mask, other=0.0)
    dst = (pid_bh.to(tl.int64) * NB + offs_t[:, None]) * D + offs_d[None, :]
    tl.store(KBUF + dst, k.to(KBUF.dtype.element_ty), mask=mask)
    tl.store(VBUF + dst, v.to(VBUF.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_blocks_kernel(
        K, V, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        LEN, MEAN, HEAD_BITS, HEAD_SLOT,
        KC4, KSC4, KZ4, VC4, VSC4, VZ4, KC2, KSC2, KZ2, VC2, VSC2, VZ2,
        KS1, VS1, KBUF, VBUF, H, H4, H2, NBLK,
        D: tl.constexpr, DP: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr,
        VG: tl.constexpr, NG: tl.constexpr, FLUSH: tl.constexpr, HAS_MEAN: tl.constexpr):
    """PREFILL: programs (2 j, b * H + h) and (2 j + 1, b * H + h) quantize prompt block j's K and V
    (the first also copies a partial block j to the buffer); FLUSH: program (0, b * H + h) moves a
    just-filled buffer (K, V = the buffer) to its block."""
    tl.static_assert(NB % 16 == 0)
    pid_j = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    length = tl.load(LEN + b)
    if FLUSH:
        length = length + 1  # the token just appended
        do_block = (length % NB) == 0
        blk = length // NB - 1
        rest = 0
        part = 0
    else:
        part = pid_j % 2
        blk = pid_j // 2
        full = length // NB
        do_block = blk < full
        rest = tl.where((blk == full) & (part == 0), length - full * NB, 0)
    src_start = tl.where(FLUSH, 0, blk * NB).to(tl.int64)
    src_k = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + src_start * stride_kn
    src_v = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + src_start * stride_vn
    if do_block:
        if part == 0:
            _pool_block(src_k, stride_kn, blk, b, h, pid_bh, MEAN, HEAD_BITS, HEAD_SLOT, KC4, KSC4, KZ4, KC2, KSC2, KZ2,
                        KS1, H4, H2, NBLK, D, DP, NB, NBP, VG, NG, HAS_MEAN, False)
        if FLUSH or part == 1:
            _pool_block(src_v, stride_vn, blk, b, h, pid_bh, MEAN, HEAD_BITS, HEAD_SLOT, VC4, VSC4, VZ4, VC2, VSC2, VZ2,
                        VS1, H4, H2, NBLK, D, DP, NB, NBP, VG, NG, HAS_MEAN, True)
    if rest > 0:
        _buffer_rows(src_k, src_v, stride_kn, stride_vn, rest, pid_bh, KBUF, VBUF, D, DP, NB, NBP)


# ----------------------------------------------------------------------------- append

@triton.jit
def _append_kernel(KN, VN, stride_kb, stride_kh, stride_vb, stride_vh, KBUF, VBUF, LEN, H,
                   NB: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """Program b * H + h: k_new[b, h, 0], v_new[b, h, 0] -> buffer slot lengths[b] % n_b."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    slot = tl.load(LEN + b) % NB
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    k = tl.load(KN + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + offs_d, mask=dmask)
    v = tl.load(VN + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + offs_d, mask=dmask)
    dst = (pid.to(tl.int64) * NB + slot) * D + offs_d
    tl.store(KBUF + dst, k.to(KBUF.dtype.element_ty), mask=dmask)
    tl.store(VBUF + dst, v.to(VBUF.dtype.element_ty), mask=dmask)


# ----------------------------------------------------------------------------- split-KV decode

def _unpack_asm(bits: int) -> str:
    """PTX: 4 bytes (one 32-bit register, Triton pack=4) -> the 8 / bits planes' codes as exact fp16.

    Two byte permutes spread bytes (0, 1) and (2, 3) into the two halves of t0 and t1; per plane, a
    shift brings its bit field down, an `and` keeps it in both halves, an `or` with the fp16 bits of
    1024 (0x6400) makes 1024 + c and a paired fp16 subtract leaves c: ~1.5 instructions per code.
    Outputs 2 p and 2 p + 1 hold plane p of bytes (0, 1) and (2, 3); the input is the last operand."""
    planes = 8 // bits
    mask = f"0x{(1 << bits) - 1:04X}{(1 << bits) - 1:04X}"
    lines = ["{", ".reg .b32 t0, t1, u0, u1, z, m;", "mov.b32 z, 0;", "mov.b32 m, 0x64006400;",
             f"prmt.b32 t0, ${2 * planes}, z, 0x4140;", f"prmt.b32 t1, ${2 * planes}, z, 0x4342;"]
    for plane in range(planes):
        src0, src1 = ("t0", "t1") if plane == 0 else ("u0", "u1")
        if plane:
            lines += [f"shr.b32 u0, t0, {bits * plane};", f"shr.b32 u1, t1, {bits * plane};"]
        lo, hi = f"${2 * plane}", f"${2 * plane + 1}"
        lines += [f"and.b32 {lo}, {src0}, {mask};", f"and.b32 {hi}, {src1}, {mask};",
                  f"or.b32 {lo}, {lo}, m;", f"or.b32 {hi}, {hi}, m;",
                  f"sub.f16x2 {lo}, {lo}, m;", f"sub.f16x2 {hi}, {hi}, m;"]
    return "\n".join(lines + ["}"])


_UNPACK4_ASM = tl.constexpr(_unpack_asm(4))
_UNPACK2_ASM = tl.constexpr(_unpack_asm(2))


@triton.jit
def _code_plane(words, PLANE: tl.constexpr, BITS: tl.constexpr):
    """Codes of one plane of packed bytes as exact fp16 (the interpreter's path): magic 1024 + c."""
    code = ((words >> (PLANE * BITS)) & ((1 << BITS) - 1)).to(tl.int16)
    return (code | F16_MAGIC_CODE).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _unpack4(words, FAST: tl.constexpr):
    """uint8 bytes -> (low-nibble codes, high-nibble codes) as exact fp16, any layout (FAST: the
    inline asm of _unpack_asm, elementwise per byte, so any packing of 4 elements is correct)."""
    if FAST:
        return tl.inline_asm_elementwise(_UNPACK4_ASM, "=r,=r,=r,=r,r", [words],
                                         dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        return _code_plane(words, 0, 4), _code_plane(words, 1, 4)


@triton.jit
def _unpack2(words, FAST: tl.constexpr):
    """uint8 bytes -> the four 2-bit planes' codes as exact fp16 (see _unpack4)."""
    if FAST:
        return tl.inline_asm_elementwise(_UNPACK2_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words],
                                         dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        return (_code_plane(words, 0, 2), _code_plane(words, 1, 2), _code_plane(words, 2, 2),
                _code_plane(words, 3, 2))


_NIBBLES_I8_ASM = tl.constexpr("{ .reg .b32 t; and.b32 $0, $2, 0x0F0F0F0F; shr.b32 t, $2, 4; "
                                 "and.b32 $1, t, 0x0F0F0F0F; }")
_CRUMBS_I8_ASM = tl.constexpr("{ .reg .b32 t; and.b32 $0, $4, 0x03030303; shr.b32 t, $4, 2; and.b32 $1, t, 0x03030303; "
                              "shr.b32 t, $4, 4; and.b32 $2, t, 0x03030303; shr.b32 t, $4, 6; "
                              "and.b32 $3, t, 0x03030303; }")


@triton.jit
def _unpack_i8(words, BITS: tl.constexpr, FAST: tl.constexpr):
    """uint8 bytes -> the 8 / BITS planes' codes as int8 (FAST: an `and` and a shift per 4 codes)."""
    if BITS == 4:
        if FAST:
            return tl.inline_asm_elementwise(_NIBBLES_I8_ASM, "=r,=r,r", [words], dtype=(tl.int8, tl.int8),
                                             is_pure=True, pack=4)
        else:
            return (words & 15).to(tl.int8), (words >> 4).to(tl.int8)
    else:
        if FAST:
            return tl.inline_asm_elementwise(_CRUMBS_I8_ASM, "=r,=r,=r,=r,r", [words],
                                             dtype=(tl.int8, tl.int8, tl.int8, tl.int8), is_pure=True, pack=4)
        else:
            return ((words & 3).to(tl.int8), ((words >> 2) & 3).to(tl.int8), ((words >> 4) & 3).to(tl.int8),
                    (words >> 6).to(tl.int8))


@triton.jit
def _kscaled_plane(qf, KSC, KZ, blk_d, offs_w, PLANE: tl.constexpr, W: tl.constexpr, WP: tl.constexpr):
    """The block's scaled query plane a = q' kscale [R, WP] fp32, and sum q' kzero [R]."""
    chan = PLANE * W + offs_w
    # int8 -> fp32 on the ALU (the compiler expands ksc, kz over the query rows before converting)
    ksc = int_to_float_exact(_load_plane(KSC + blk_d + chan, offs_w, W, WP).to(tl.int32))
    kz = int_to_float_exact(_load_plane(KZ + blk_d + chan, offs_w, W, WP).to(tl.int32))
    return qf * ksc[None, :], tl.sum(qf * kz[None, :], axis=1)


@triton.jit
def _split_i8(a, inv):
    """a * inv (|a * inv| <= 127) as hi + lo / 254 with hi, lo int8: the nearest integer and the
    residual's nearest 1/254 step, ~15 bits of a in two INT8 tensor-core operands. Rounding by the
    magic number 1.5 * 2^23 (y + M has y's nearest integer in its low mantissa bits), so no
    float -> int conversion instruction is needed."""
    y = a * inv[:, None]
    t = y + MAGIC_F
    hi = t.to(tl.int32, bitcast=True) - MAGIC_I
    u = (y - (t - MAGIC_F)) * 254.0 + MAGIC_F
    lo = u.to(tl.int32, bitcast=True) - MAGIC_I
    return hi.to(tl.int8), lo.to(tl.int8)


@triton.jit
def _qk_i8(a, inv, codes, acc_hi, acc_lo, QK_SPLIT: tl.constexpr):
    """acc_hi (+ acc_lo) += INT8 products of a * inv (split hi + lo / 254 when QK_SPLIT) with the codes."""
    hi, lo = _split_i8(a, inv)
    acc_hi = tl.dot(hi, codes, acc_hi, out_dtype=tl.int32)
    if QK_SPLIT:
        acc_lo = tl.dot(lo, codes, acc_lo, out_dtype=tl.int32)
    return acc_hi, acc_lo


@triton.jit
def _fma16(a, b, c, FAST: tl.constexpr):
    """a * b + c in fp16 (exact here: integers below 2048); FAST: paired fma.rn.f16x2."""
    if FAST:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.float16, is_pure=True, pack=2)
    else:
        return a * b + c


@triton.jit
def _split16(x):
    """fp32 -> (hi, lo) fp16 with hi + lo = x to ~2^-22 relative (two tensor-core products keep fp32)."""
    hi = x.to(tl.float16)
    return hi, (x - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _load_plane(ptrs, offs_w, W: tl.constexpr, WP: tl.constexpr):
    """Load a tile whose columns are a plane's words: masked only when the plane is not a power of two
    wide (an unmasked load vectorizes)."""
    if W == WP:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=(offs_w < W), other=0)


@triton.jit
def _q_plane(Q_rows, gmask, fold, offs_w, PLANE: tl.constexpr, W: tl.constexpr):
    """Plane PLANE of the folded query q' = q sm_scale log2(e): channels PLANE W + w, [BLOCK_G, WP] fp32."""
    chan = PLANE * W + offs_w
    return tl.load(Q_rows[:, None] + chan[None, :], mask=gmask[:, None] & (offs_w < W)[None, :],
                   other=0.0).to(tl.float32) * fold


@triton.jit
def _scaled_q_plane(qf, KSC, KZ, blk_d, offs_w, PLANE: tl.constexpr, W: tl.constexpr, WP: tl.constexpr):
    """The block's scaled query plane: (q' kscale) hi, lo [BLOCK_G, WP] and sum q' kzero."""
    a, zsum = _kscaled_plane(qf, KSC, KZ, blk_d, offs_w, PLANE, W, WP)
    hi, lo = _split16(a)
    return hi, lo, zsum


@triton.jit
def _scales16(x):
    """int8 scales or zero points -> exact fp16 without the conversion unit: the fp16 bits of
    1536 + x are 0x6600 + x for -512 <= x < 512. The compiler expands the [BLOCK_N, groups] tile to
    every element of the code tile before converting; an I2F per element (a quarter of the ALU
    rate) was the largest cost of the loop, an integer add and an fp16 subtract are not."""
    return (x.to(tl.int16) + F16_MAGIC_INT).to(tl.float16, bitcast=True) - 1536.0


@triton.jit
def _plane_v(codes, VSC, VZ, grow, offs_w, PLANE: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
             VG: tl.constexpr, BLOCK_N: tl.constexpr, FAST: tl.constexpr):
    """Dequantize one plane of V codes [BLOCK_N, WP] to exact INT8-stage values in fp16:
    code * scale + zero with the per-(token, group) scale and zero of each column's channel.

    When the plane is whole groups (W a multiple of VG and a power of two) the scales broadcast from
    a [BLOCK_N, W // VG] tile; otherwise each of the plane's (at most three) groups is selected."""
    G0: tl.constexpr = (PLANE * W) // VG
    G1: tl.constexpr = (PLANE * W + W - 1) // VG
    if (W % VG == 0) and (W == WP):
        GPP: tl.constexpr = W // VG
        g_off = grow[:, None] + G0 + tl.arange(0, GPP)[None, :]
        vsc = _scales16(tl.load(VSC + g_off))
        vz = _scales16(tl.load(VZ + g_off))
        vsc = tl.reshape(tl.broadcast_to(vsc[:, :, None], (BLOCK_N, GPP, VG)), (BLOCK_N, WP))
        vz = tl.reshape(tl.broadcast_to(vz[:, :, None], (BLOCK_N, GPP, VG)), (BLOCK_N, WP))
    else:
        chan = (PLANE * W + offs_w)[None, :]
        vsc = tl.broadcast_to(_scales16(tl.load(VSC + grow + G0))[:, None], (BLOCK_N, WP))
        vz = tl.broadcast_to(_scales16(tl.load(VZ + grow + G0))[:, None], (BLOCK_N, WP))
        for g in tl.static_range(G0 + 1, G1 + 1):
            take = chan >= g * VG
            vsc = tl.where(take, _scales16(tl.load(VSC + grow + g))[:, None], vsc)
            vz = tl.where(take, _scales16(tl.load(VZ + grow + g))[:, None], vz)
    return _fma16(codes, vsc, vz, FAST)


@triton.jit
def _pv(acc, p_hi, p_lo, v16, alpha, s1v, PV_HILO: tl.constexpr):
    pv = tl.dot(p_hi, v16, out_dtype=tl.float32)
    if PV_HILO:
        pv += tl.dot(p_lo, v16, out_dtype=tl.float32)
    return acc * alpha[:, None] + pv * s1v


@triton.jit
def _store_plane(PACC, part_row, gmask, acc, offs_w, PLANE: tl.constexpr, W: tl.constexpr, D: tl.constexpr):
    ptrs = PACC + part_row[:, None] * D + (PLANE * W + offs_w)[None, :]
    tl.store(ptrs, acc, mask=gmask[:, None] & (offs_w < W)[None, :])


@triton.jit
def _packed_split(Q_rows, fold, KC, KSC, KZ, VC, VSC, VZ, KS1_bh, VS1_bh, pool_head, tile_lo, tile_hi,
                  PM, PL, PACC, part_row, gmask,
                  D: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                  VG: tl.constexpr, NG: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr,
                  PV_HILO: tl.constexpr):
    """Online softmax over packed tiles [tile_lo, tile_hi) of one (sequence, KV head) in pool `BITS`.

    Plane by plane: byte w of a token row holds channels w + i W (i < 8 / BITS), so a tile's bytes
    are loaded once ([W, BLOCK_N] for K, [BLOCK_N, W] for V) and unpacked into one fp16 code tile per
    plane; the query is split the same way (plane i = channels i W .. i W + W - 1), so
    s = sum_i (q' kscale)_i . kcode_i and acc_i += p . (vcode_i vscale + vzero), one product per
    plane (two: fp32 operands split hi + lo). Columns past W (D = 80, 96) are masked to zero.
    """
    PW: tl.constexpr = 8 // BITS
    W: tl.constexpr = D // PW
    WP: tl.constexpr = max(16, triton.next_power_of_2(W))
    TPB: tl.constexpr = NB // BLOCK_N
    offs_w = tl.max_contiguous(tl.multiple_of(tl.arange(0, WP), WP), WP)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_G, WP], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_G, WP], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_G, WP], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_G, WP], dtype=tl.float32)
    qf0 = _q_plane(Q_rows, gmask, fold, offs_w, 0, W)
    qf1 = _q_plane(Q_rows, gmask, fold, offs_w, 1, W)
    if BITS == 2:
        qf2 = _q_plane(Q_rows, gmask, fold, offs_w, 2, W)
        qf3 = _q_plane(Q_rows, gmask, fold, offs_w, 3, W)
    else:
        qf2 = qf0
        qf3 = qf0
    for tile in range(tile_lo, tile_hi):
        blk = tile // TPB
        pool_blk = pool_head + blk  # int64
        row0 = pool_blk * NB + (tile - blk * TPB) * BLOCK_N  # first token row of the tile in the pool
        blk_d = pool_blk * D
        # scores: s = s1k * (sum_c (q'_c kscale_c) code_c + sum_c q'_c kzero_c)
        kb = _load_plane(KC + row0 * W + (offs_n[None, :] * W + offs_w[:, None]), offs_w[:, None], W, WP)
        q0h, q0l, z0 = _scaled_q_plane(qf0, KSC, KZ, blk_d, offs_w, 0, W, WP)
        q1h, q1l, z1 = _scaled_q_plane(qf1, KSC, KZ, blk_d, offs_w, 1, W, WP)
        if BITS == 4:
            k0, k1 = _unpack4(kb, FAST)
            dots = tl.dot(q0h, k0, out_dtype=tl.float32) + tl.dot(q0l, k0, out_dtype=tl.float32)
            dots += tl.dot(q1h, k1, out_dtype=tl.float32) + tl.dot(q1l, k1, out_dtype=tl.float32)
            zsum = z0 + z1
        else:
            q2h, q2l, z2 = _scaled_q_plane(qf2, KSC, KZ, blk_d, offs_w, 2, W, WP)
            q3h, q3l, z3 = _scaled_q_plane(qf3, KSC, KZ, blk_d, offs_w, 3, W, WP)
            k0, k1, k2, k3 = _unpack2(kb, FAST)
            dots = tl.dot(q0h, k0, out_dtype=tl.float32) + tl.dot(q0l, k0, out_dtype=tl.float32)
            dots += tl.dot(q1h, k1, out_dtype=tl.float32) + tl.dot(q1l, k1, out_dtype=tl.float32)
            dots += tl.dot(q2h, k2, out_dtype=tl.float32) + tl.dot(q2l, k2, out_dtype=tl.float32)
            dots += tl.dot(q3h, k3, out_dtype=tl.float32) + tl.dot(q3l, k3, out_dtype=tl.float32)
            zsum = z0 + z1 + z2 + z3
        s = (dots + zsum[:, None]) * tl.load(KS1_bh + blk)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p_hi, p_lo = _split16(p)
        # values: v = s1v * (code * scale + zero), dequantized in registers, exact in fp16
        vb = _load_plane(VC + row0 * W + (offs_n[:, None] * W + offs_w[None, :]), offs_w[None, :], W, WP)
        grow = (row0 + offs_n) * NG
        s1v = tl.load(VS1_bh + blk)
        if BITS == 4:
            v0, v1 = _unpack4(vb, FAST)
        else:
            v0, v1, v2, v3 = _unpack2(vb, FAST)
            acc2 = _pv(acc2, p_hi, p_lo, _plane_v(v2, VSC, VZ, grow, offs_w, 2, W, WP, VG, BLOCK_N, FAST), alpha, s1v, PV_HILO)
            acc3 = _pv(acc3, p_hi, p_lo, _plane_v(v3, VSC, VZ, grow, offs_w, 3, W, WP, VG, BLOCK_N, FAST), alpha, s1v, PV_HILO)
        acc0 = _pv(acc0, p_hi, p_lo, _plane_v(v0, VSC, VZ, grow, offs_w, 0, W, WP, VG, BLOCK_N, FAST), alpha, s1v, PV_HILO)
        acc1 = _pv(acc1, p_hi, p_lo, _plane_v(v1, VSC, VZ, grow, offs_w, 1, W, WP, VG, BLOCK_N, FAST), alpha, s1v, PV_HILO)
        m_i = m_new
    tl.store(PM + part_row, m_i, mask=gmask)
    tl.store(PL + part_row, l_i, mask=gmask)
    _store_plane(PACC, part_row, gmask, acc0, offs_w, 0, W, D)
    _store_plane(PACC, part_row, gmask, acc1, offs_w, 1, W, D)
    if BITS == 2:
        _store_plane(PACC, part_row, gmask, acc2, offs_w, 2, W, D)
        _store_plane(PACC, part_row, gmask, acc3, offs_w, 3, W, D)


@triton.jit
def _packed_split_i8(Q_bh, stride_qh, fold, KC, KSC, KZ, VC, VSC, VZ, KS1_bh, VS1_bh, pool_head, tile_lo, tile_hi,
                     PM, PL, PACC, part_base, num_parts, G,
                     D: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                     VG: tl.constexpr, NG: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr,
                     PV_HILO: tl.constexpr, QK_SPLIT: tl.constexpr):
    """Online softmax over packed tiles [tile_lo, tile_hi) of one (sequence, KV head) in pool `BITS`,
    with INT8 tensor-core scores and V's scales folded into P (FlashQ's decode). QK_SPLIT: a as
    hi + lo / 254 (two INT8 products, ~15 bits) instead of one INT8 operand (~7 bits).

    Rows r = g NG + j (g < G query heads, j < NG V groups): row r carries query head g, replicated
    for each V group, so that P can be scaled per group: p'_r = p_g * vscale[t, j] and
    acc_r += p'_r . vcode + (sum_t p_g vzero[t, j]), where only the columns of group j are kept at
    the end. Scores per tile: a = q' kscale quantized to INT8 per row (a8, amax / 127), then
    s = s1k * (amax / 127 * (a8 . kcode) + q' . kzero), both products over the raw codes (INT8 and
    exact fp16): no per-element dequantization. Planes as in `_packed_split`. (sm_90 SASS, D = 128,
    4 query heads: 901 instructions per thread per 64-token 4-bit tile with one operand, 995 with
    two, against 1416 for `_packed_split`; two operands take 217 registers against 168.)
    """
    PW: tl.constexpr = 8 // BITS
    W: tl.constexpr = D // PW
    WP: tl.constexpr = max(16, triton.next_power_of_2(W))
    TPB: tl.constexpr = NB // BLOCK_N
    offs_w = tl.max_contiguous(tl.multiple_of(tl.arange(0, WP), WP), WP)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    g_r = offs_r // NG
    j_r = offs_r % NG
    rmask = offs_r < G * NG
    Q_rows = Q_bh + g_r.to(tl.int64) * stride_qh
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_R, WP], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_R, WP], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_R, WP], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_R, WP], dtype=tl.float32)
    qf0 = _q_plane(Q_rows, rmask, fold, offs_w, 0, W)
    qf1 = _q_plane(Q_rows, rmask, fold, offs_w, 1, W)
    if BITS == 2:
        qf2 = _q_plane(Q_rows, rmask, fold, offs_w, 2, W)
        qf3 = _q_plane(Q_rows, rmask, fold, offs_w, 3, W)
    else:
        qf2 = qf0
        qf3 = qf0
    for tile in range(tile_lo, tile_hi):
        blk = tile // TPB
        pool_blk = pool_head + blk  # int64
        row0 = pool_blk * NB + (tile - blk * TPB) * BLOCK_N  # first token row of the tile in the pool
        blk_d = pool_blk * D
        kb = _load_plane(KC + row0 * W + (offs_n[None, :] * W + offs_w[:, None]), offs_w[:, None], W, WP)
        a0, z0 = _kscaled_plane(qf0, KSC, KZ, blk_d, offs_w, 0, W, WP)
        a1, z1 = _kscaled_plane(qf1, KSC, KZ, blk_d, offs_w, 1, W, WP)
        amax = tl.maximum(tl.max(tl.abs(a0), axis=1), tl.max(tl.abs(a1), axis=1))
        zsum = z0 + z1
        if BITS == 2:
            a2, z2 = _kscaled_plane(qf2, KSC, KZ, blk_d, offs_w, 2, W, WP)
            a3, z3 = _kscaled_plane(qf3, KSC, KZ, blk_d, offs_w, 3, W, WP)
            amax = tl.maximum(amax, tl.maximum(tl.max(tl.abs(a2), axis=1), tl.max(tl.abs(a3), axis=1)))
            zsum += z2 + z3
        inv = tl.where(amax > 0, 127.0 / amax, 0.0)
        d_hi = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.int32)
        d_lo = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.int32)
        if BITS == 4:
            c0, c1 = _unpack_i8(kb, 4, FAST)
            d_hi, d_lo = _qk_i8(a0, inv, c0, d_hi, d_lo, QK_SPLIT)
            d_hi, d_lo = _qk_i8(a1, inv, c1, d_hi, d_lo, QK_SPLIT)
        else:
            c0, c1, c2, c3 = _unpack_i8(kb, 2, FAST)
            d_hi, d_lo = _qk_i8(a0, inv, c0, d_hi, d_lo, QK_SPLIT)
            d_hi, d_lo = _qk_i8(a1, inv, c1, d_hi, d_lo, QK_SPLIT)
            d_hi, d_lo = _qk_i8(a2, inv, c2, d_hi, d_lo, QK_SPLIT)
            d_hi, d_lo = _qk_i8(a3, inv, c3, d_hi, d_lo, QK_SPLIT)
        dots = d_hi.to(tl.float32)
        if QK_SPLIT:
            dots += d_lo.to(tl.float32) * (1.0 / 254.0)
        s = (dots * (amax * (1.0 / 127.0))[:, None] + zsum[:, None]) * tl.load(KS1_bh + blk)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # values: p' = p * vscale of the row's group, the zero points as one sum per row
        g_off = (row0 + offs_n)[None, :] * NG + j_r[:, None]
        vsc = int_to_float_exact(tl.load(VSC + g_off).to(tl.int32))
        vz = int_to_float_exact(tl.load(VZ + g_off).to(tl.int32))
        pz = tl.sum(p * vz, axis=1)
        p_hi, p_lo = _split16(p * vsc)
        s1v = tl.load(VS1_bh + blk)
        vb = _load_plane(VC + row0 * W + (offs_n[:, None] * W + offs_w[None, :]), offs_w[None, :], W, WP)
        if BITS == 4:
            v0, v1 = _unpack4(vb, FAST)
        else:
            v0, v1, v2, v3 = _unpack2(vb, FAST)
            acc2 = _pv_folded(acc2, p_hi, p_lo, v2, pz, alpha, s1v, PV_HILO)
            acc3 = _pv_folded(acc3, p_hi, p_lo, v3, pz, alpha, s1v, PV_HILO)
        acc0 = _pv_folded(acc0, p_hi, p_lo, v0, pz, alpha, s1v, PV_HILO)
        acc1 = _pv_folded(acc1, p_hi, p_lo, v1, pz, alpha, s1v, PV_HILO)
        m_i = m_new
    head_row = part_base + g_r.to(tl.int64) * num_parts
    first = rmask & (j_r == 0)
    tl.store(PM + head_row, m_i, mask=first)
    tl.store(PL + head_row, l_i, mask=first)
    _store_group_plane(PACC, head_row, rmask, j_r, acc0, offs_w, 0, W, D, VG)
    _store_group_plane(PACC, head_row, rmask, j_r, acc1, offs_w, 1, W, D, VG)
    if BITS == 2:
        _store_group_plane(PACC, head_row, rmask, j_r, acc2, offs_w, 2, W, D, VG)
        _store_group_plane(PACC, head_row, rmask, j_r, acc3, offs_w, 3, W, D, VG)


@triton.jit
def _pv_folded(acc, p_hi, p_lo, v16, pz, alpha, s1v, PV_HILO: tl.constexpr):
    pv = tl.dot(p_hi, v16, out_dtype=tl.float32)
    if PV_HILO:
        pv += tl.dot(p_lo, v16, out_dtype=tl.float32)
    return acc * alpha[:, None] + (pv + pz[:, None]) * s1v


@triton.jit
def _store_group_plane(PACC, head_row, rmask, j_r, acc, offs_w, PLANE: tl.constexpr, W: tl.constexpr,
                       D: tl.constexpr, VG: tl.constexpr):
    """Row r = (g, j) holds head g's output for the channels of V group j: store those columns."""
    chan = PLANE * W + offs_w
    keep = rmask[:, None] & (offs_w < W)[None, :] & ((chan // VG)[None, :] == j_r[:, None])
    tl.store(PACC + head_row[:, None] * D + chan[None, :], acc, mask=keep)


@triton.jit
def _buffer_split(Q_rows, fold, KBUF_bh, VBUF_bh, MEAN_bh, count, KN_row, VN_row, PM, PL, PACC, part_row, gmask,
                  D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                  HAS_MEAN: tl.constexpr, APPEND: tl.constexpr, FP32_PRODUCTS: tl.constexpr):
    """Online softmax over the `count` fp16/bf16 buffer tokens: s = q' . k - q' . mu (K stored raw).

    APPEND: the last of them is the new token, taken from k_new / v_new in registers and written to
    its buffer slot here (no other program reads the buffer, so there is no hazard). Products: fp16
    tensor cores with q' and p split hi + lo; FP32_PRODUCTS (bf16 buffers) plain fp32 products
    (bf16 hi + lo would keep only 16 bits, and Triton's interpreter cannot multiply bf16), at most
    n_b tokens a step, so their cost is small.
    """
    offs_d = tl.arange(0, DP)
    offs_n = tl.arange(0, BLOCK_N)
    dmask = offs_d < D
    buf_ty = KBUF_bh.dtype.element_ty
    qf = tl.load(Q_rows[:, None] + offs_d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * fold
    if HAS_MEAN:
        qmu = tl.sum(qf * tl.load(MEAN_bh + offs_d, mask=dmask, other=0.0)[None, :], axis=1)
    else:
        qmu = tl.zeros([BLOCK_G], dtype=tl.float32)
    q_hi = qf.to(buf_ty)
    q_lo = (qf - q_hi.to(tl.float32)).to(buf_ty)
    new_pos = count - 1
    stored = count
    if APPEND:
        stored = new_pos
        k_new = tl.load(KN_row + offs_d, mask=dmask, other=0.0).to(buf_ty)
        v_new = tl.load(VN_row + offs_d, mask=dmask, other=0.0).to(buf_ty)
        tl.store(KBUF_bh + new_pos * D + offs_d, k_new, mask=dmask)
        tl.store(VBUF_bh + new_pos * D + offs_d, v_new, mask=dmask)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, DP], dtype=tl.float32)
    for start in range(0, count, BLOCK_N):
        tok = start + offs_n
        tmask = tok < count
        lmask = tok < stored
        kt = tl.load(KBUF_bh + tok[None, :] * D + offs_d[:, None], mask=dmask[:, None] & lmask[None, :], other=0.0)  # [DP, BLOCK_N]
        v = tl.load(VBUF_bh + tok[:, None] * D + offs_d[None, :], mask=lmask[:, None] & dmask[None, :], other=0.0)
        if APPEND:
            kt = tl.where(tok[None, :] == new_pos, k_new[:, None], kt)
            v = tl.where(tok[:, None] == new_pos, v_new[None, :], v)
        if FP32_PRODUCTS:
            s = tl.dot(qf, kt.to(tl.float32), input_precision="ieee") - qmu[:, None]
        else:
            s = tl.dot(q_hi, kt, out_dtype=tl.float32) + tl.dot(q_lo, kt, out_dtype=tl.float32) - qmu[:, None]
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP32_PRODUCTS:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            p_hi = p.to(buf_ty)
            p_lo = (p - p_hi.to(tl.float32)).to(buf_ty)
            pv = tl.dot(p_hi, v, out_dtype=tl.float32) + tl.dot(p_lo, v, out_dtype=tl.float32)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    tl.store(PM + part_row, m_i, mask=gmask)
    tl.store(PL + part_row, l_i, mask=gmask)
    tl.store(PACC + part_row[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _decode_split_kernel(
        Q, stride_qb, stride_qh, KN, VN, stride_knb, stride_knh, stride_vnb, stride_vnh,
        LEN, MEAN, HEAD_BITS, HEAD_SLOT,
        KC4, KSC4, KZ4, VC4, VSC4, VZ4, KC2, KSC2, KZ2, VC2, VSC2, VZ2,
        KS1, VS1, KBUF, VBUF, PM, PL, PACC, fold,
        H, H4, H2, NBLK, NUM_SPLITS, tiles_per_split,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, NB: tl.constexpr,
        BLOCK_N: tl.constexpr, VG: tl.constexpr, NG: tl.constexpr, HAS_MEAN: tl.constexpr, APPEND: tl.constexpr,
        FAST: tl.constexpr, PV_HILO: tl.constexpr, INT8_QK: tl.constexpr, QK_SPLIT: tl.constexpr,
        BLOCK_R: tl.constexpr):
    """Program (s, b * H + h): packed tiles of split s (s < NUM_SPLITS) or the buffer (s == NUM_SPLITS)
    for the G query heads of KV head h, over lengths[b] + 1 tokens (the new token included).
    APPEND: the buffer program also appends k_new / v_new (a step without a flush); without it they
    were appended (and flushed) by the separate kernels."""
    tl.static_assert(NB % BLOCK_N == 0)
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    length = tl.load(LEN + b) + 1
    full = length // NB
    offs_g = tl.arange(0, BLOCK_G)
    gmask = offs_g < G
    hq = h * G + offs_g
    Q_rows = Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh
    num_parts = NUM_SPLITS + 1
    part_row = ((b * H * G + hq) * num_parts + pid_s).to(tl.int64)
    if pid_s == NUM_SPLITS:
        _buffer_split(Q_rows, fold, KBUF + pid_bh.to(tl.int64) * NB * D, VBUF + pid_bh.to(tl.int64) * NB * D,
                      MEAN + pid_bh.to(tl.int64) * D, length - full * NB,
                      KN + b.to(tl.int64) * stride_knb + h.to(tl.int64) * stride_knh,
                      VN + b.to(tl.int64) * stride_vnb + h.to(tl.int64) * stride_vnh,
                      PM, PL, PACC, part_row, gmask, D, DP, BLOCK_N, BLOCK_G, HAS_MEAN, APPEND,
                      KBUF.dtype.element_ty != tl.float16)
    else:
        tile_lo = pid_s * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, full * (NB // BLOCK_N))
        bits = tl.load(HEAD_BITS + h)
        slot = tl.load(HEAD_SLOT + h)
        KS1_bh = KS1 + pid_bh.to(tl.int64) * NBLK
        VS1_bh = VS1 + pid_bh.to(tl.int64) * NBLK
        Q_bh = Q + b.to(tl.int64) * stride_qb + (h * G).to(tl.int64) * stride_qh
        part_base = ((b * H * G + h * G) * num_parts + pid_s).to(tl.int64)
        if bits == 4:
            pool_head = (b.to(tl.int64) * H4 + slot) * NBLK
            if INT8_QK:
                _packed_split_i8(Q_bh, stride_qh, fold, KC4, KSC4, KZ4, VC4, VSC4, VZ4, KS1_bh, VS1_bh, pool_head,
                                 tile_lo, tile_hi, PM, PL, PACC, part_base, num_parts, G, D, NB, BLOCK_N, BLOCK_R, VG,
                                 NG, 4, FAST, PV_HILO, QK_SPLIT)
            else:
                _packed_split(Q_rows, fold, KC4, KSC4, KZ4, VC4, VSC4, VZ4, KS1_bh, VS1_bh, pool_head, tile_lo,
                              tile_hi, PM, PL, PACC, part_row, gmask, D, NB, BLOCK_N, BLOCK_G, VG, NG, 4, FAST, PV_HILO)
        else:
            pool_head = (b.to(tl.int64) * H2 + slot) * NBLK
            if INT8_QK:
                _packed_split_i8(Q_bh, stride_qh, fold, KC2, KSC2, KZ2, VC2, VSC2, VZ2, KS1_bh, VS1_bh, pool_head,
                                 tile_lo, tile_hi, PM, PL, PACC, part_base, num_parts, G, D, NB, BLOCK_N, BLOCK_R, VG,
                                 NG, 2, FAST, PV_HILO, QK_SPLIT)
            else:
                _packed_split(Q_rows, fold, KC2, KSC2, KZ2, VC2, VSC2, VZ2, KS1_bh, VS1_bh, pool_head, tile_lo,
                              tile_hi, PM, PL, PACC, part_row, gmask, D, NB, BLOCK_N, BLOCK_G, VG, NG, 2, FAST, PV_HILO)


@triton.jit
def _decode_reduce_kernel(PM, PL, PACC, OUT, stride_ob, stride_oh, LEN, HQ, NUM_PARTS,
                          D: tl.constexpr, DP: tl.constexpr, CHUNK: tl.constexpr, COMMIT: tl.constexpr):
    """Program b * Hq + hq: combine the partials of every split into o for one query head ([CHUNK, D]
    per step; one program per query head, so a short batch still spreads over many SMs);
    COMMIT advances lengths[b] (program hq == 0)."""
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    row0 = pid.to(tl.int64) * NUM_PARTS  # partial rows of (b, hq)
    m_run = tl.max(tl.full([CHUNK], float("-inf"), dtype=tl.float32), axis=0)
    l_run = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), axis=0)
    acc = tl.zeros([DP], dtype=tl.float32)
    for start in range(0, NUM_PARTS, CHUNK):
        parts = start + offs_c
        pmask = parts < NUM_PARTS
        m = tl.load(PM + row0 + parts, mask=pmask, other=float("-inf"))
        l = tl.load(PL + row0 + parts, mask=pmask, other=0.0)
        a = tl.load(PACC + (row0 + parts)[:, None] * D + offs_d[None, :], mask=pmask[:, None] & dmask[None, :],
                    other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(m - m_safe)
        r = tl.exp2(m_run - m_safe)
        l_run = l_run * r + tl.sum(w * l, axis=0)
        acc = acc * r + tl.sum(w[:, None] * a, axis=0)
        m_run = m_new
    out = acc / tl.maximum(l_run, 1e-30)
    out = tl.where(l_run > 0, out, 0.0)
    o_ptrs = OUT + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh + offs_d
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=dmask)
    if COMMIT:
        if hq == 0:
            tl.store(LEN + b, tl.load(LEN + b) + 1)
