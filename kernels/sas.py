"""Triton helpers for SAS (the paper's Sparse Activated Softmax) and cheap numeric conversions.

`sas_exp2_times_127(neg)`: 127 * 2^-neg for neg >= 0 as LUT[n] * poly3(f) with neg = n + f (the
reference's `sas_exp2` times P's INT8 scale). The LUT of 2^-n is built from exponent bits
((134 - n) << 23 reinterpreted as fp32), so it costs one integer op and no memory; n and f come
from one add rounding toward minus infinity against the magic number (no conversion instruction);
poly3 runs on the FMA pipe, leaving the special-function unit (which exp2 uses) free.

`int_to_float_exact(i)`: int32 -> fp32 for |i| < 2^22 without an I2F conversion instruction:
adding the integer to the bits of 1.5 * 2^23 lands it in the mantissa, and one fp32 subtraction
removes the offset. Conversions run at a fraction of the FMA rate on Hopper (DESIGN section 8).

`round_to_int8(p)`: p in [0, 127.x] -> int8 by the same trick (round to nearest even), instead
of an F2I conversion.

`to_e4m3(x)`: fp32 -> float8 e4m3 (round to nearest even), two values per conversion instruction
on the GPU (F2FP ... E4M3 PACK_AB); under the interpreter the value is first rounded on the e4m3
grid in fp32, because the interpreter's own fp32 -> fp8 conversion mis-rounds (127 -> 64).
"""

import triton
import triton.language as tl

from .reference import SAS_POLY_COEFFS

MAGIC_F = tl.constexpr(12582912.0)  # 1.5 * 2^23
MAGIC_I = tl.constexpr(0x4B400000)  # its bits
SAS_POW2_BIAS = tl.constexpr(134 << 23)  # fp32 bits of 2^7 = 127's scale, less n << 23 per octave


# 127 * 2^x = 2^(7 - n) * (127/128) * poly3(f): the P quantization scale folds into the exponent
# bias and the coefficients, so the kernel gets P on its INT8 grid with no extra multiply.
SAS127_C0 = tl.constexpr(SAS_POLY_COEFFS[0] * 127.0 / 128.0)
SAS127_C1 = tl.constexpr(SAS_POLY_COEFFS[1] * 127.0 / 128.0)
SAS127_C2 = tl.constexpr(SAS_POLY_COEFFS[2] * 127.0 / 128.0)
SAS127_C3 = tl.constexpr(SAS_POLY_COEFFS[3] * 127.0 / 128.0)


@triton.jit
def floor_plus_magic(x, FAST: tl.constexpr):
    """MAGIC_F + floor(x) for |x| < 2^22, exact: its low mantissa bits hold floor(x) (bits MAGIC_I + n).

    FAST: one fp32 add rounding toward minus infinity (add.rm), where FRND + F2I would take two
    conversion-unit instructions (a quarter of the FMA rate on Hopper)."""
    if FAST:
        return tl.inline_asm_elementwise("add.rm.f32 $0, $1, 0f4B400000;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.floor(x) + MAGIC_F


@triton.jit
def sas_exp2_times_127(neg, FAST: tl.constexpr):
    """127 * 2^-neg for neg in [-1, 134] (the caller clamps; -1: fp32 rounding at the row max) by SAS:
    -x = n + f with n = floor(neg); 0 once n >= 134 (the reference zeroes from 127 on: < 1e-36 apart).

    n comes as MAGIC_I + n in the bits of t = MAGIC_F + n, so 2^(7 - n) = (134 - n) << 23 is one
    integer multiply-add on those bits (MAGIC_I << 23 vanishes mod 2^32), f = neg - (t - MAGIC_F)."""
    t = floor_plus_magic(neg, FAST)
    f = neg - (t - MAGIC_F)
    poly = ((SAS127_C3 * f + SAS127_C2) * f + SAS127_C1) * f + SAS127_C0
    pow2 = ((t.to(tl.int32, bitcast=True) << 23) * -1 + SAS_POW2_BIAS).to(tl.float32, bitcast=True)
    return pow2 * poly


@triton.jit
def int_to_float_exact(i):
    """int32 with |i| < 2^22 -> fp32, exactly, on the ALU and FMA pipes (no I2F)."""
    return (i + MAGIC_I).to(tl.float32, bitcast=True) - MAGIC_F


@triton.jit
def round_to_uint7(x):
    """fp32 x in [0, 127.5) -> int8 round-half-even(x), by FADD and a byte truncation (no F2I)."""
    return (x + MAGIC_F).to(tl.int32, bitcast=True).to(tl.int8)


E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def to_e4m3(x, FAST: tl.constexpr):
    """fp32 x with |x| <= 448 -> float8e4nv, round to nearest even (torch's float8_e4m3fn rounding).

    FAST: the GPU's conversion. Otherwise x is rounded on the e4m3 grid first (3 mantissa bits by
    an integer add on its bits; below 2^-6, multiples of 2^-9 by a magic add), so the conversion
    that follows is exact."""
    if FAST:
        return x.to(tl.float8e4nv)
    else:
        bits = x.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
        mag = tl.abs(x)
        sub = (mag + 16384.0) - 16384.0  # 2^14: the fp32 ulp there is 2^-9, e4m3's subnormal step
        sub = tl.where(x < 0, -sub, sub)
        return tl.where(mag < 0.015625, sub, normal).to(tl.float8e4nv)
