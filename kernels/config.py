"""KernelConfig: every tunable of the TurboAttention kernels in one frozen, validated record.

The autotuner searches over these fields, the JSON loader builds one from a tuned file, and the
kernels and the plain-torch reference read their numerics and launch parameters from it. An
invalid value raises ValueError naming the field and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

POWERS_OF_TWO_TILE = (16, 32, 64, 128, 256)
NUM_WARPS_CHOICES = (1, 2, 4, 8, 16)
# "fp8" (e4m3) is a planned second compute format; only INT8 (the paper's) is implemented.
COMPUTE_FORMATS = ("int8", "fp8_pv")
P_SCALE_MODES = ("row", "fixed")
BALANCE_MODES = ("qk", "k", "none")
KV_BITS_CHOICES = (2, 4)
# Exponents past this many octaves below the running row maximum contribute less than 2^-64 of
# the maximum; the kernels clamp the tile-local reference maximum there so that a fully masked
# tile row never computes -inf - (-inf).
REF_MAX_CLAMP = 64.0


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"KernelConfig.{name} must be one of {list(choices)}, got {value!r}")


def _check_int_range(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"KernelConfig.{name} must be an int in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"KernelConfig.{name} must be in [{low}, {high}], got {value}")


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters and numerics of the prefill, quantization and decode kernels.

    Prefill (FlashQ attention):
      block_m: Br, query rows per program and per INT8 Q tile (16..256, power of two).
      block_n: Bc, key/value rows per inner-loop tile and per INT8 K/V tile (16..256, power of two).
      num_warps, num_stages: Triton launch parameters of the attention kernel.
      max_registers: a cap on the attention kernel's registers per thread (Triton's maxnreg; 32..255),
        None = the compiler's choice. On sm_90 the default tiles take 255, which lets two programs
        share an SM; 168 with num_stages=2 fits three (more warps to overlap one program's tensor-core
        products with another's softmax) at the price of spills (`python -m autotune bench sass`:
        30 local-memory accesses per KV tile, 901 instructions against 855); timed on the H100 (llama3-8b,
        4k, `bench sweep-prefill`): 1.318 ms (2 stages) and 1.412 ms (3 stages) against 1.238 / 1.184
        ms uncapped, so the spills cost more than the third program gains.
      compute_format: "int8" (the paper's INT8 tensor-core products for QK^T and PV), or "fp8_pv":
        INT8 QK^T and an FP8 e4m3 PV product (P = 127 p and V per Bc tile at max|v| / 448, both
        rounded to nearest even; fp32 accumulation). FP8 P packs two values per conversion and the
        product comes out in fp32, so the softmax-to-PV path has fewer instructions per score;
        e4m3 keeps 3 mantissa bits at every magnitude where INT8 P loses resolution on small p.
        Hopper and newer (sm_89+); prefill only (the KV cache and the decode are unaffected).
      p_scale: "row" quantizes P per row of each tile against the tile-local maximum (no extra
        reduction, better accuracy on flat attention); "fixed" uses 1/127 against the running max.
      smooth_k: subtract the per-channel mean of K over the sequence (it cancels in softmax and
        removes the shared offset of outlier channels).
      balance: with smooth_k, move part of K's per-channel range into Q (k / c, q * c; the
        product is unchanged): "qk" c = sqrt(amax_k / amax_q) (needs a statistics pass over Q),
        "k" c = sqrt(amax_k) (K only, cheaper; ~1.5 dB worse when Q has outliers in K's
        channels), "none".
    SAS (softmax):
      use_sas: exponential as LUT[n] * degree-3 polynomial(f) on FMA units; False = exact exp2.
      sparsity_threshold: T in log2 units (octaves below the row max): scores at or below
        max - T give 0, and a KV tile in which no row keeps a score skips its softmax and PV
        product (exact: that update is the identity). None = keep all.
    KV cache (BPQ stage 2, head-wise mixed precision):
      bit_mix: fraction of KV heads (lowest priority first) stored at 2 bits; the rest at 4.
      buffer_tokens: n_b, tokens kept in fp16 before a flush; also the K quantization group
        (K is quantized per channel over each block of n_b tokens).
      v_group: channels per V quantization group (V is quantized per token over channel groups).
    Defaults are the fastest accurate prefill measured on an H100 (reports/bench/sweep-prefill-h100.csv):
    Br=64, Bc=128, 4 warps, 3 stages; exact exp2 without a threshold, because there (dense inputs,
    before the conversion-free SAS floor and the tile skipping) the SAS polynomial ran ~1.5x slower
    than the special-function unit and the threshold's compare-select cost ~15% while the SFU was
    not the binding unit. SAS and the threshold stay tuned choices (and an ablation).
    Decode (split-KV, flash-decoding style):
      decode_block_n, decode_num_warps, decode_num_stages: launch parameters of the decode kernel.
      decode_q_split: scores of packed tokens from q' * kscale as two INT8 tensor-core operands
        (hi + lo / 254, ~15 bits: as accurate as the fp16 products) instead of one (~7 bits per
        query row and block, FlashQ's INT8 Q; H100: 20-25% faster at batch >= 4, cosine against
        exact ~0.006 lower on keys with 10-20x outlier channels). fp32 queries always split.
      num_splits: partitions of the context per (sequence, KV head); None = chosen from the
        context length and the GPU's SM count.
    """

    block_m: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3
    compute_format: str = "int8"
    p_scale: str = "row"
    smooth_k: bool = True
    balance: str = "qk"
    use_sas: bool = False
    sparsity_threshold: float | None = None
    bit_mix: float = 0.0
    buffer_tokens: int = 64
    v_group: int = 32
    decode_block_n: int = 64
    decode_num_warps: int = 4
    decode_num_stages: int = 2
    decode_q_split: bool = False
    num_splits: int | None = None
    max_registers: int | None = None

    def __post_init__(self) -> None:
        _check_choice("block_m", self.block_m, POWERS_OF_TWO_TILE)
        _check_choice("block_n", self.block_n, POWERS_OF_TWO_TILE)
        _check_choice("num_warps", self.num_warps, NUM_WARPS_CHOICES)
        _check_int_range("num_stages", self.num_stages, 1, 8)
        _check_choice("compute_format", self.compute_format, COMPUTE_FORMATS)
        _check_choice("p_scale", self.p_scale, P_SCALE_MODES)
        _check_choice("balance", self.balance, BALANCE_MODES)
        for flag in ("smooth_k", "use_sas", "decode_q_split"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"KernelConfig.{flag} must be a bool, got {getattr(self, flag)!r}")
        t = self.sparsity_threshold
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
                raise ValueError(f"KernelConfig.sparsity_threshold must be a number in [1, 60] or None, got {t!r}")
            if not 1.0 <= float(t) <= 60.0:
                raise ValueError(f"KernelConfig.sparsity_threshold must be in [1, 60] (log2 units) or None, got {t}")
            object.__setattr__(self, "sparsity_threshold", float(t))
        if isinstance(self.bit_mix, bool) or not isinstance(self.bit_mix, (int, float)) or not 0.0 <= self.bit_mix <= 1.0:
            raise ValueError(f"KernelConfig.bit_mix must be a fraction in [0, 1], got {self.bit_mix!r}")
        object.__setattr__(self, "bit_mix", float(self.bit_mix))
        _check_int_range("buffer_tokens", self.buffer_tokens, 16, 1024)
        if self.buffer_tokens % 16:
            raise ValueError(f"KernelConfig.buffer_tokens must be a multiple of 16 in [16, 1024], got {self.buffer_tokens}")
        _check_choice("v_group", self.v_group, (16, 32, 64, 128))
        _check_choice("decode_block_n", self.decode_block_n, POWERS_OF_TWO_TILE)
        _check_choice("decode_num_warps", self.decode_num_warps, NUM_WARPS_CHOICES)
        _check_int_range("decode_num_stages", self.decode_num_stages, 1, 8)
        if self.num_splits is not None:
            _check_int_range("num_splits", self.num_splits, 1, 1024)
        if self.max_registers is not None:
            _check_int_range("max_registers", self.max_registers, 32, 255)

    def replace(self, **changes: Any) -> "KernelConfig":
        """A copy with some fields changed (validated like a new config)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"KernelConfig has no field(s) {sorted(unknown)}; fields: {field_names()}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "KernelConfig":
        """Build from a mapping; unknown keys are an error (a typo must not pass silently)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"KernelConfig.from_dict expects a mapping, got {type(data).__name__}")
        unknown = set(data) - set(field_names())
        if unknown:
            raise ValueError(f"unknown KernelConfig field(s) {sorted(unknown)}; fields: {field_names()}")
        return cls(**dict(data))


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(KernelConfig)]


DEFAULT_CONFIG = KernelConfig()
