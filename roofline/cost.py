"""Per-kernel work (operations per execution unit, DRAM and L2 bytes), feasibility, and the
predicted time of one KernelConfig on one GPU.

Kernels (KERNELS), modelled on kernels/quant.py and kernels/prefill.py:
  "quantize"           BPQ stage 1 of K and V: fp16 -> INT8 codes + fp32 scales per tile (V written
                       transposed per tile, [D, Bc], for the K-major INT8 PV product), after the
                       smoothing statistics of K (and of Q's channel maxima) when smooth_k.
  "prefill"            FlashQ forward: reads the fp16 Q tile and quantizes it in registers, INT8
                       QK^T and INT8 PV on tensor cores, online softmax in base 2 with the
                       exponential on the SFU or (SAS) on the FMA pipe.
  "decode"             one query token per sequence against the packed 4/2-bit cache plus the
                       fp16 residual buffer, split-KV (flash-decoding) with a reduction pass.
  "sdpa_prefill_fp16"  baseline: fp16 flash attention (FA2/cuDNN-like) on fp16 tensor cores.
  "sdpa_decode_fp16"   baseline: fp16 split-KV decode over an fp16 cache.

Execution units (UNITS) and what a unit's count means:
  int8_tc  INT8 tensor-core operations (a multiply-add counts 2); peak gpu.int8_tops.
  fp16_tc  fp16 tensor-core flops (a multiply-add counts 2); peak gpu.fp16_tflops.
  fma      FP32/ALU-pipe lane instructions (FFMA, FMUL, FMNMX, IMNMX, shifts...); an FFMA counts
           ONE here; peak gpu.fp32_tflops / 2 instructions per second.
  sfu      quarter-rate lane instructions: MUFU.EX2 and the PTX cvt family (I2F, F2I, FRND), all
           16 per clock per SM in the CUDA Programming Guide throughput table; peak gpu.sfu_tops.
           (DESIGN.md section 8 on the H100: exp2 4.1 T/s; a polynomial exp2 using floor() and an
           int conversion 2.0 T/s, i.e. two such instructions per result.)

Roofs (ROOFS), each with an efficiency factor (fraction of the peak a kernel reaches; a key
"<kernel>.<roof>", e.g. "quantize.memory", overrides the roof's factor for one kernel):
  memory   max(DRAM bytes / bandwidth, L2->SM bytes / L2 bandwidth)
  int8_tc  int8_tc ops / int8 peak          fp16_tc  fp16_tc ops / fp16 peak
  sfu_fma  max(sfu ops / sfu peak, fma instructions / fma peak): separate pipes, run in parallel

Counts are executed work at tile granularity (a causal diagonal tile is computed whole, a partial
last tile is computed whole, head_dim runs as compute_head_dim channels). Cost.flops is the
nominal count every provider is judged by, 4*B*Hq*N^2*D (halved when causal), as DESIGN.md says.

Prediction (see predict): with t_r = ideal_r / efficiency_r for each roof,
  compute = max_c t_c + (1 - compute_overlap) * (sum_c t_c - max_c t_c) + loop_overhead
  core    = max(compute, t_memory) + (1 - memory_overlap) * min(compute, t_memory)
  time    = core / wave_efficiency + LAUNCH_OVERHEAD_S + (launches - 1) * INTER_KERNEL_GAP_S
With full overlap this is the textbook roofline, max_r t_r / wave_efficiency + launch.
Every heuristic constant below is data with the reason next to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

from .gpus import GPUSpec, resolve_gpu

KERNELS = ("quantize", "prefill", "decode", "sdpa_prefill_fp16", "sdpa_decode_fp16")
UNITS = ("int8_tc", "fp16_tc", "fma", "sfu")
ROOFS = ("memory", "int8_tc", "fp16_tc", "sfu_fma")
COMPUTE_ROOFS = ("int8_tc", "fp16_tc", "sfu_fma")

# Fraction of each datasheet peak that the kernels reach, fitted (calibrate.fit_efficiency, log
# least squares) on an H100 SXM on 2026-11-23 to 93 prefill configs x 5 shapes (llama3-8b N=1k..16k,
# phi3 D=96, smollm2 D=64), 18 quantize runs, cuDNN SDPA prefill and decode (the timings are in
# roofline/calibrations/h100-sxm.validation.json). Per-kernel fits: prefill int8_tc 0.34, sfu_fma
# 0.48, memory (mostly its L2 term) 0.46; cuDNN prefill fp16_tc 0.74; cuDNN decode memory 0.82;
# quantize memory 0.28 (it is latency bound, not bandwidth bound). Prefill: rank correlation per
# shape 0.8-0.9, the predicted best config within 2% of the measured best on every shape, rms log
# error 0.19. For comparison, a plain Triton matmul reaches 0.59 (fp16) and 0.58 (INT8) of the
# datasheet (DESIGN.md section 8): the attention kernel has headroom left. On other GPUs these
# factors are a guess until a calibration is saved for them.
DEFAULT_EFFICIENCY: Mapping[str, float] = {"memory": 0.8, "int8_tc": 0.35, "fp16_tc": 0.7, "sfu_fma": 0.5,
                                           "prefill.memory": 0.46, "quantize.memory": 0.28}
# The same fit against the H100's measured ceilings (calibrate.measure_ceilings: copy 2,907 GB/s,
# torch.matmul fp16 705 TFLOPS, torch._int_mm 926 TOPS; the SFU/FMA peaks stay the datasheet's).
DEFAULT_EFFICIENCY_VS_MEASURED: Mapping[str, float] = {"memory": 0.9, "int8_tc": 0.7, "fp16_tc": 0.95,
                                                       "sfu_fma": 0.5, "prefill.memory": 0.46,
                                                       "quantize.memory": 0.33}

# ---- operation counts per score element (one (query row, key) pair of one head) ----
# Counted from the kernels as of 2026-11-23 (kernels/prefill.py, kernels/sas.py, kernels/quant.py:
# commit a33bf93 and the follow-up that quantizes Q inside the prefill kernel); when the kernels
# change, change these and refit the calibration. INT8 prefill, besides the two products and the exponential:
#   fma pipe (6): IADD of the magic number (int32 S -> fp32 exactly, no I2F), FMNMX row max,
#                 FFMA y*scale - bias, FADD row sum, FADD of the magic number (P rounded to an
#                 integer, no F2I), ~1 for the byte truncation/packing of P and, on the diagonal
#                 band, the causal select.
#   sfu pipe (0): the magic-number tricks replace every I2F/F2I of the score path.
ELEMENTWISE_FMA_OPS_PER_SCORE = 6
CONVERSIONS_PER_SCORE = 0
THRESHOLD_FMA_OPS_PER_SCORE = 2  # FSETP + FSEL when config.sparsity_threshold is not None
# Tiles of the masked loop (the causal diagonal band; the ragged last tile) also build the mask:
# two integer compares, an AND and the select per score element.
MASK_FMA_OPS_PER_SCORE = 4
# Per accumulator element (Br x D) per KV tile: the int32 pv read as MAGIC_F + pv by one IADD,
# then (acc*alpha - MAGIC_F*coef) + y*coef in two FFMA (commit 21bb66a): 3, no conversion. Per
# score element that is 3*D/Bc, so a wider KV tile amortises it. (The H100 timings in
# calibrations/ were taken with the previous 4-instruction epilogue.)
ACC_CONVERSIONS = 0
ACC_UPDATE_FMA_OPS = 3
# SAS exponential (kernels/sas.py sas_exp2_times_127), per exponential: the FMNMX clamp (with a
# threshold, the threshold's select instead), FADD.RM against the magic number (floor(-x) in the
# mantissa), two FADD for f, 3 FFMA (Horner, degree 3), one IMAD for 2^-n in the exponent bits:
# 8 on the fma pipe and, since the magic-number floor (no FRND, no F2I), nothing on the sfu pipe,
# against 1 MUFU.EX2 for exp2. (Before it: 2 cvt at the quarter rate, which is why the polynomial
# measured 2.0 T/s against 4.1 for exp2 in DESIGN.md section 8; the 48 SAS prefill records of
# reports/roofline were measured on that kernel.) SASS, D = 128, Br 64, Bc 128, 4 warps: 1411
# instructions per thread per tile with a threshold (was 1520), exp2 with a threshold 1018 (was 1186).
SAS_FMA_OPS_PER_EXP = 8
SAS_CONVERSIONS_PER_EXP = 0
# Per score, the part of the softmax that runs even in a tile the threshold skips: the magic-number
# add of the scores and the row maximum (the skip test needs only the row maxima).
SKIP_TEST_FMA_OPS_PER_SCORE = 2
# fp16 flash-attention baseline per score element: FMNMX, FFMA (scale - max), FADD (row sum),
# 1 select/misc on the fma pipe; P -> fp16 with one packed F2F per two elements on the sfu pipe;
# FMUL per accumulator element per tile for the rescale.
FP16_ELEMENTWISE_FMA_OPS_PER_SCORE = 4
FP16_CONVERSIONS_PER_SCORE = 0.5
FP16_ACC_UPDATE_FMA_OPS = 1
# quantize (kernels/quant.py), per input element: fp16 -> fp32 (1), |x| max (1), x * 127/amax (1),
# +-0.5 by sign (FSETP + FSEL + FADD: 3), clamp to [-127, 127] (2), pack to int8 (~0.5, counted 1):
# 9 on the fma pipe; the F2I of .to(int32) on the sfu pipe. smooth_k adds the channel statistics
# pass (sum, max, min: 3) and the shift and multiply (2) on Q and K elements.
QUANT_FMA_OPS_PER_ELEMENT = 9
QUANT_CONVERSIONS_PER_ELEMENT = 1
SMOOTH_K_FMA_OPS_PER_ELEMENT = 5
QUANT_INPUT_BYTES = 2  # fp16/bf16 inputs
# decode, per cached element (K or V, token x channel) of the packed cache: counted in the SASS of
# kernels/decode.py's packed loop (4-bit, D = 128, 64-token tiles, 4 warps, sm_90, Triton 3.6):
# ~1450 instructions per warp per tile, i.e. 1450 * 128 threads / (64 tokens * 128 channels * 2)
# = 11.3 thread-instructions per element on the integer / fp32 pipes (byte unpack, magic-number
# fp16 codes, the scale broadcast and its int8 -> fp16 conversions, the register shuffles and
# shared-memory round trips that feed the MMA operands): the loop is issue-bound, not memory-bound.
# Counted over the real channels D: the D = 96 loop (two 48-byte planes, scales selected per plane)
# is 1200 instructions per warp per tile against 1462 for D = 128 (0.82; 96 / 128 = 0.75).
DEQUANT_FMA_OPS_PER_ELEMENT = 12
# The 2-bit loop (four planes, a scale tile per plane) is 1789 instructions per warp per tile against
# 1536 for 4 bits (Triton 3.6 SASS at commit 59bb802, both after the scale conversions left I2F): x 1.16.
DEQUANT_FMA_OPS_PER_ELEMENT_2BIT = 12 * 1789 / 1536
# The INT8-score decode (kernels/decode.py `_packed_split_i8`, since commit 81218da) runs where a KV
# head's query heads x V groups fit one 16-row tile (DECODE_FOLDED_ROWS, mirrors
# kernels.decode.FOLDED_ROWS): no element is dequantized; its SASS has 901 instructions per thread
# per 64-token 4-bit tile and 881 for 2 bits, against 1416 for the fp16 path at the same commit
# (0.64x), but at batch 16 (throughput-bound) it ran 0.76x the fp16 path's time (514 against 674 us,
# llama3-8b 32k): it holds more registers (fewer warps per SM to hide latency). The throughput term
# uses the measured 0.76, the serial per-tile latency the instruction ratio (records: decode MAPE
# 16.4% with 0.76, 17.9% with 0.64).
DECODE_FOLDED_ROWS = 16
FOLDED_OPS_PER_ELEMENT = DEQUANT_FMA_OPS_PER_ELEMENT * 0.76
FOLDED_OPS_PER_ELEMENT_2BIT = FOLDED_OPS_PER_ELEMENT * 881 / 901
FOLDED_LATENCY_RATIO = 901 / 1416  # its serial per-tile latency, in proportion to the instructions
# More warps than its 16-column share per warp cost it in full (measured: 8 warps on 64-token tiles
# ~2x slower than 4), not as the square root DECODE_REPLICATION_EXPONENT gives the fp16 path.
DECODE_FOLDED_REPLICATION_EXPONENT = 1.0
# Measured (roofline records, H100): 8 warps on 64-token tiles and 4 warps on 32-token tiles run the
# packed loop 1.5-1.7x slower than 4 warps on 64 tokens or 2 on 32: the unpack work scales with
# warps x 16 / BLOCK_N once that exceeds 1 (Triton splits the [16, BLOCK_N] products over the warps
# along BLOCK_N and rebuilds the shared operands per warp).
DECODE_MIN_COLUMNS_PER_WARP = 16
DECODE_REPLICATION_EXPONENT = 0.5
# The serial path of a decode step when SMs are idle (short contexts, batch 1): one program alone on
# an SM issues its ~1450 instructions per warp per 64-token tile at about half an instruction per
# cycle per scheduler (each step waits on the one before: load, unpack, MMA, softmax, MMA), ~3000
# cycles per tile; the reduction kernel that follows adds its own load-and-combine latency.
DECODE_TILE_LATENCY_CYCLES = 3000
DECODE_REDUCE_LATENCY_S = 2e-6
# Per tile, whatever its length, the program also rebuilds the block's scaled query (q' * kscale,
# [16, D], split hi + lo) over its warps: a dependent chain of the K scales' load (~600 cycles from
# L2), the products and the hi/lo split, a shared-memory round trip with its barriers into the MMA
# operand layout (~32 16-bit stores per thread at 4 warps): ~2000 cycles at 4 warps, twice that at 2.
# Short tiles and few warps pay it more often (2 warps on 32-token tiles: measured ~35% slower than
# 4 on 64 at batch 1). The value was checked against the records (1000: 15.0%, 2000: 14.3%, 3000:
# 15.1% calibrated MAPE), so it is chosen on them like the other structural constants.
DECODE_TILE_PREP_CYCLES = 2000
# The shortest SDPA decode step measured on the H100 (cuDNN, B=1, 4k context, CUDA graph) is ~14 us
# for ~4 us of DRAM traffic: two dependent kernels' launch and load latency, about 10 us past launch.
SDPA_DECODE_LATENCY_S = 10e-6
SDPA_FLASH_DECODE_LATENCY_S = 16e-6  # FlashAttention-2's shortest step there: ~21 us
# decode, per score element: max, scale-and-subtract, row sum, select (4); P -> fp16 (0.5 packed F2F).
DECODE_ELEMENTWISE_FMA_OPS_PER_SCORE = 4
DECODE_CONVERSIONS_PER_SCORE = 0.5
# torch SDPA's FLASH_ATTENTION backend is FlashAttention-2: warp-level mma.sync, no wgmma, which on
# Hopper reaches about 62% of the dense fp16 tensor-core peak (~610 of 990 TFLOP/s in public
# FA2-vs-FA3 measurements); cuDNN's kernels use wgmma. The measured ratio of the two backends here
# (prefill-h100.csv: 317-340 vs 519-556 TOPS) is 0.6.
MMA_SYNC_FRACTION = 0.62
# tl.dot needs at least 16 rows: the Hq/Hkv query heads that share a KV head are padded to 16.
MMA_MIN_ROWS = 16
MMA_ROWS_PER_WARP = 16  # mma.m16n8k* on sm_80/89 and wgmma's 64 rows per 4-warp group on sm_90

# ---- structural heuristics ----
LAUNCH_OVERHEAD_S = 4e-6  # the first launch of a call: host + grid start (typical torch/Triton launch)
INTER_KERNEL_GAP_S = 1.5e-6  # each further launch of the same call (queued, so only the GPU-side gap)
# Fixed cost of one inner-loop iteration of a program (barrier, pointer and mask arithmetic, scale
# loads, loop-carried row statistics) that neither pipe's throughput captures. It makes tiny tiles
# slow (many iterations for the same work). Overlapped across programs resident on one SM.
ITERATION_OVERHEAD_CYCLES = 300
# Fixed cost of one program outside its loop (Q tile load and quantization latency, the row
# statistics' final reduction, the O store), exposed because every program waits for its own Q.
PROGRAM_OVERHEAD_CYCLES = 4000
# Overlap of the tensor-core phase with the SFU/FMA phase (see predict). Chosen on the H100
# timings of 93 prefill configs x 5 shapes (kernels of 2026-11-23): the phases of co-resident
# programs do NOT overlap measurably (0 per extra program: rank correlation 0.8-0.9 per shape,
# against 0.5-0.8 with 1.0), while Hopper's asynchronous wgmma hides about half (depth 1).
# ITERATION_OVERHEAD_CYCLES and PROGRAM_OVERHEAD_CYCLES were chosen on the same data (the small-N
# shapes need the per-program cost; the measured time per score falls 1.8x from N=1k to N=4k).
COMPUTE_OVERLAP_PER_PROGRAM = 0.0
OVERHEADS_OVERLAP_ACROSS_PROGRAMS = True
ASYNC_MMA_OVERLAP_DEPTH = 1
BASELINE_OVERLAP = 1.0  # cuDNN/FlashAttention-3 are warp-specialised: MMA, softmax and loads overlap
L2_USABLE_FRACTION = 0.5  # share of L2 that K/V re-reads can count on (Q, O and other traffic use the rest)
REGISTER_BASE_PER_THREAD = 32  # pointers, offsets, loop counters, row statistics, scales
MAX_REGS_PER_THREAD = 255  # hardware limit per thread; beyond it the compiler spills to local memory
REGISTER_SOFT_LIMIT = 224  # near the limit Triton's allocator starts spilling in practice ...
REGISTER_PRESSURE_PENALTY = 0.85  # ... so compute rates are scaled by this above the soft limit
RESERVED_SMEM_PER_BLOCK = 1024  # CUDA reserves 1 KB of shared memory per block (sm_80 and later)
MAX_THREADS_PER_BLOCK = 1024
# Programs per SM at which an SM's pipes are saturated: a partial last wave that still gives each SM
# this many programs loses nothing, so wave slots beyond it are not counted as idle.
SATURATING_PROGRAMS_PER_SM = 2
BUFFER_FILL_FRACTION = 0.5  # the fp16 residual buffer holds n_b/2 tokens on average between flushes
DECODE_TARGET_PROGRAMS_PER_SM = 2  # num_splits=None: enough splits for ~2 programs per SM ...
DECODE_TILES_PER_SPLIT = 16  # ... or about 16 tiles per split when that gives more splits ...
DECODE_MIN_TILES_PER_SPLIT = 4  # ... but at least 4 KV tiles per split (kernels/decode.py)
# kernels/decode.py splits every fp32 operand of a tensor-core product into fp16 hi + lo planes:
# each product runs twice.
DECODE_PRODUCT_PASSES = 2
QUANT_NUM_WARPS = 4  # the quantization kernel's launch (not a KernelConfig field)

# Mirrors kernels.config.KernelConfig's defaults so that roofline need not import kernels
# (tests/test_roofline.py checks that the two agree). sas_fma_fraction is the SFU/FMA split of
# the exponentials under SAS (DESIGN.md section 8), 1.0 = all on the FMA pipe, until the config
# grows such a field.
CONFIG_DEFAULTS: Mapping[str, Any] = {
    "block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 3,
    "use_sas": False, "sparsity_threshold": None, "p_scale": "row", "smooth_k": True,
    "bit_mix": 0.0, "buffer_tokens": 64, "v_group": 32,
    "decode_block_n": 64, "decode_num_warps": 4, "decode_num_stages": 2, "num_splits": None,
    "max_registers": None, "sas_fma_fraction": 1.0,
}
# What the fp16 baselines are modelled with (FA2's tiles for D <= 128 on sm_80/90).
BASELINE_CONFIG: Mapping[str, Any] = dict(CONFIG_DEFAULTS, block_m=128, block_n=64, num_warps=8, num_stages=2,
                                          use_sas=False, sparsity_threshold=None, smooth_k=False,
                                          decode_block_n=64, decode_num_warps=4, decode_num_stages=2)


class InfeasibleConfigError(ValueError):
    """predict() on a config that check_feasible rejects; the message carries the reason."""


# ----------------------------------------------------------------------------- inputs

def _check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {list(KERNELS)}, got {kernel!r}")
    return kernel


def padded_head_dim(head_dim: int) -> int:
    """The power of two >= max(16, head_dim): the width of the INT8 code tensors in memory."""
    return max(16, 1 << (int(head_dim) - 1).bit_length())


def compute_head_dim(head_dim: int) -> int:
    """Channels the kernels compute on, as kernels.prefill.head_dim_split lays them out: a power of
    two runs whole (at least 16); otherwise the largest power of two below D (when >= 64) plus a
    tail of max(32, next power of two of the rest) channels, so D=96 -> 64+32 and D=80 -> 64+32;
    below 64, the next power of two."""
    d = int(head_dim)
    dh = 1 << (d.bit_length() - 1)
    if dh == d or dh < 64:
        return padded_head_dim(d)
    return dh + max(32, padded_head_dim(d - dh))


@dataclass(frozen=True)
class AttentionShape:
    """One attention call. seq_len is N for prefill/quantize and the context length (cached tokens,
    the new one included) for decode, where there is one query token per sequence.

    pv_skip_fraction: share of (query tile, KV tile) pairs whose PV product SAS skips because every
    score is under the sparsity threshold; data dependent (measure it with the reference), 0 = none.
    """

    batch: int
    num_q_heads: int
    num_kv_heads: int
    seq_len: int
    head_dim: int
    causal: bool = True
    pv_skip_fraction: float = 0.0

    def __post_init__(self) -> None:
        for name in ("batch", "num_q_heads", "num_kv_heads", "seq_len", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AttentionShape.{name} must be a positive int, got {value!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"AttentionShape.num_q_heads ({self.num_q_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if not isinstance(self.causal, bool):
            raise ValueError(f"AttentionShape.causal must be a bool, got {self.causal!r}")
        if not 0.0 <= float(self.pv_skip_fraction) <= 1.0:
            raise ValueError(f"AttentionShape.pv_skip_fraction must be in [0, 1], got {self.pv_skip_fraction!r}")

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def padded_head_dim(self) -> int:
        return padded_head_dim(self.head_dim)

    @property
    def compute_head_dim(self) -> int:
        return compute_head_dim(self.head_dim)

    @classmethod
    def for_model(cls, model, seq_len: int, batch: int = 1, causal: bool = True) -> "AttentionShape":
        """The shape of one layer's attention of `model` (a ModelSpec or anything resolve_model takes)."""
        from .models import resolve_model

        spec = resolve_model(model)
        return cls(batch=batch, num_q_heads=spec.num_q_heads, num_kv_heads=spec.num_kv_heads,
                   seq_len=seq_len, head_dim=spec.head_dim, causal=causal)


def _as_shape(shape: Any) -> AttentionShape:
    if isinstance(shape, AttentionShape):
        return shape
    if isinstance(shape, Mapping):
        return AttentionShape(**shape)
    raise TypeError(f"shape must be an AttentionShape or a mapping of its fields, got {type(shape).__name__}")


_POW2_FIELDS = ("block_m", "block_n", "decode_block_n")
_WARP_FIELDS = ("num_warps", "decode_num_warps")


def resolve_config(config: Any = None) -> dict[str, Any]:
    """The knobs the cost model reads, from a KernelConfig-like object (attributes), a mapping, or
    None (CONFIG_DEFAULTS); missing fields take CONFIG_DEFAULTS. Errors name the field."""
    values = dict(CONFIG_DEFAULTS)
    for name in CONFIG_DEFAULTS:
        if config is None:
            break
        if isinstance(config, Mapping):
            if name in config:
                values[name] = config[name]
        elif hasattr(config, name):
            values[name] = getattr(config, name)
    for name in _POW2_FIELDS:
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"config.{name} must be a power-of-two int, got {v!r}")
    for name in _WARP_FIELDS:
        if values[name] not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"config.{name} must be one of [1, 2, 4, 8, 16, 32], got {values[name]!r}")
    for name in ("num_stages", "decode_num_stages", "buffer_tokens", "v_group"):
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config.{name} must be a positive int, got {v!r}")
    if values["num_splits"] is not None and (not isinstance(values["num_splits"], int) or values["num_splits"] < 1):
        raise ValueError(f"config.num_splits must be a positive int or None, got {values['num_splits']!r}")
    for name in ("bit_mix", "sas_fma_fraction"):
        if not 0.0 <= float(values[name]) <= 1.0:
            raise ValueError(f"config.{name} must be in [0, 1], got {values[name]!r}")
    return values


def _config_for(kernel: str, config: Any) -> dict[str, Any]:
    """The knobs of `kernel`: the SDPA baselines take BASELINE_CONFIG plus the torch backend when the
    config names one ({"backend": "FLASH_ATTENTION"} etc.), TurboAttention kernels resolve_config."""
    if kernel.startswith("sdpa_"):
        knobs = dict(BASELINE_CONFIG)
        backend = config.get("backend") if isinstance(config, Mapping) else None
        knobs["backend"] = str(backend).upper() if backend else None
        return knobs
    return resolve_config(config)


def num_low_bit_heads(num_kv_heads: int, bit_mix: float) -> int:
    """floor(bit_mix * Hkv): KV heads stored at 2 bits (the rest at 4), as kernels.reference does."""
    return int(math.floor(bit_mix * num_kv_heads + 1e-9))


def decode_num_splits(shape: AttentionShape, config: Any, gpu: "str | GPUSpec") -> int:
    """Splits of the packed context per (sequence, KV head), as kernels.decode.decode_num_splits
    chooses them: tiles = (ctx // n_b) * (n_b // decode_block_n) packed tiles; config.num_splits
    capped at tiles, else min(max(ceil(2 * SMs / (B * Hkv)), tiles // 16), tiles // 4), at least 1; then evened out
    (ceil(tiles / ceil(tiles / splits))). The fp16 baseline splits ctx / decode_block_n tiles alike."""
    shape = _as_shape(shape)
    knobs = resolve_config(config)
    gpu = resolve_gpu(gpu)
    bn, nb = knobs["decode_block_n"], knobs["buffer_tokens"]
    tiles = (shape.seq_len // nb) * max(1, nb // bn) if bn <= nb else shape.seq_len // bn
    if tiles <= 0:
        return 1
    if knobs["num_splits"] is not None:
        splits = max(1, min(knobs["num_splits"], tiles))
    else:
        want = max(math.ceil(DECODE_TARGET_PROGRAMS_PER_SM * gpu.sm_count / (shape.batch * shape.num_kv_heads)),
                   tiles // DECODE_TILES_PER_SPLIT)
        splits = max(1, min(want, tiles // DECODE_MIN_TILES_PER_SPLIT))
    return math.ceil(tiles / math.ceil(tiles / splits))


# ----------------------------------------------------------------------------- resources

class ResourceUsage(NamedTuple):
    """Per-block resources of one launch and the occupancy they allow."""

    smem_bytes: int
    regs_per_thread: int
    threads: int
    blocks_per_sm: int  # 0 = does not fit on an SM at all
    limiter: str  # "smem" | "registers" | "threads" | "blocks"
    smem_breakdown: dict
    spills: bool = False  # config.max_registers under the estimate: the compiler spills to local memory


def resource_usage(kernel: str, config: Any, gpu: "str | GPUSpec", head_dim: int) -> ResourceUsage:
    """Shared memory and registers per block, and resident blocks per SM.

    prefill (element size e = 1 for INT8, 2 for the fp16 baseline; Dp = compute_head_dim):
      smem = num_stages * (Bc*Dp*e [K tile] + Dp*Bc*e [V^T tile] + 8 [two fp32 scales])
             + Br*Dp*e [Q tile] + Br*Bc [INT8 P, exchanged through smem into the PV product's A
             operand layout; the fp16 baseline keeps P in registers, as FlashAttention-2 does]
             + 1 KiB reserved
      regs/thread = ceil((Br*Dp [fp32 accumulator] + Br*Bc [fp32 scores] + Br*Dp*e/4 [Q operand,
                    4/e elements per register]) / (32*num_warps)) + 32
    decode (Bd = decode_block_n; the group of query heads padded to 16 rows):
      smem = decode_num_stages * (Bd*Dp [K and V codes at 4 bits] + 4*Dp [K scale/zero, int16]
             + 4*Bd*ceil(Dp/v_group) [V scale/zero]) + 4*Bd*Dp [dequantized fp16 K, V tiles]
             + 32*Dp [fp16 Q, 16 rows] + 1 KiB   (fp16 baseline: stages * 4*Bd*Dp + 32*Dp + 1 KiB)
      regs/thread = ceil((16*Dp + 16*Bd + Bd*Dp [fp16 K, V tiles, 2 per register]) / threads) + 32
    quantize: 4 warps, a Br x Dp fp16 tile in registers, 1 KiB of smem for the reductions.
    blocks/SM = min(max blocks, max threads / threads, regs_per_sm / (regs rounded up to 8 * threads),
                    smem per SM / smem).
    prefill with config.max_registers: regs/thread = min(estimate, cap); under the estimate the kernel
    spills (ResourceUsage.spills), which `predict` charges as register pressure.
    """
    kernel = _check_kernel(kernel)
    gpu = resolve_gpu(gpu)
    knobs = _config_for(kernel, config)
    dp = compute_head_dim(head_dim)
    if kernel in ("prefill", "sdpa_prefill_fp16"):
        e = 1 if kernel == "prefill" else 2
        bm, bn, stages = knobs["block_m"], knobs["block_n"], knobs["num_stages"]
        threads = 32 * knobs["num_warps"]
        breakdown = {"kv_stages": stages * (bn * dp * e + dp * bn * e + (8 if e == 1 else 0)),
                     "q_tile": bm * dp * e, "p_exchange": bm * bn if e == 1 else 0,
                     "reserved": RESERVED_SMEM_PER_BLOCK}
        live_regs = bm * dp + bm * bn + bm * dp * e / 4
    elif kernel in ("decode", "sdpa_decode_fp16"):
        bn, stages = knobs["decode_block_n"], knobs["decode_num_stages"]
        threads = 32 * knobs["decode_num_warps"]
        if kernel == "decode":
            per_stage = bn * dp + 4 * dp + 4 * bn * math.ceil(dp / knobs["v_group"])
            breakdown = {"kv_stages": stages * per_stage, "dequantized_tiles": 4 * bn * dp}
        else:
            breakdown = {"kv_stages": stages * 4 * bn * dp}
        breakdown.update({"q_tile": 2 * MMA_MIN_ROWS * dp, "reserved": RESERVED_SMEM_PER_BLOCK})
        live_regs = MMA_MIN_ROWS * dp + MMA_MIN_ROWS * bn + bn * dp
    else:  # quantize
        threads = 32 * QUANT_NUM_WARPS
        breakdown = {"reductions": 0, "reserved": RESERVED_SMEM_PER_BLOCK}
        live_regs = max(knobs["block_m"], knobs["block_n"]) * dp / 2
    smem = int(sum(breakdown.values()))
    regs = int(math.ceil(live_regs / threads)) + REGISTER_BASE_PER_THREAD
    cap = knobs.get("max_registers") if kernel == "prefill" else None
    spilled = cap is not None and cap < min(regs, MAX_REGS_PER_THREAD)
    if cap is not None:
        regs = min(regs, cap)  # the compiler spills the rest (the penalty below counts it as pressure)
    regs_alloc = 8 * math.ceil(min(regs, MAX_REGS_PER_THREAD) / 8)
    limits = {
        "blocks": gpu.max_blocks_per_sm,
        "threads": gpu.max_threads_per_sm // threads,
        "registers": gpu.regs_per_sm // (regs_alloc * threads),
        "smem": int(gpu.smem_per_sm_kb * 1024) // smem,
    }
    limiter = min(limits, key=lambda k: (limits[k], k != "smem"))
    return ResourceUsage(smem, regs, threads, max(0, limits[limiter]), limiter, breakdown, spilled)


def check_feasible(kernel: str, config: Any, gpu: "str | GPUSpec", head_dim: int) -> tuple[bool, str]:
    """(ok, reason): whether `config` can launch `kernel` at `head_dim` on `gpu`, judged by the
    estimates of resource_usage against the GPU's limits (shared memory per block, 255 registers per
    thread, 1024 threads per block, at least one resident block per SM)."""
    kernel = _check_kernel(kernel)
    gpu = resolve_gpu(gpu)
    use = resource_usage(kernel, config, gpu, head_dim)
    smem_limit = int(gpu.smem_per_block_kb * 1024)
    parts = ", ".join(f"{k} {v / 1024:.1f}" for k, v in use.smem_breakdown.items())
    if use.smem_bytes > smem_limit:
        return False, (f"shared memory: {kernel} needs {use.smem_bytes / 1024:.1f} KiB per block ({parts} KiB) "
                       f"> {gpu.smem_per_block_kb:g} KiB per block on {gpu.key}; lower num_stages or the tile sizes")
    if use.regs_per_thread > MAX_REGS_PER_THREAD:
        return False, (f"registers: {kernel} needs ~{use.regs_per_thread} per thread > {MAX_REGS_PER_THREAD} "
                       f"({use.threads} threads); raise num_warps or lower the tile sizes")
    if use.threads > MAX_THREADS_PER_BLOCK:
        return False, f"threads: {use.threads} per block > {MAX_THREADS_PER_BLOCK}"
    if use.blocks_per_sm < 1:
        return False, (f"occupancy: not one block fits on an SM of {gpu.key} (limited by {use.limiter}: "
                       f"{use.regs_per_thread} regs x {use.threads} threads, {use.smem_bytes / 1024:.1f} KiB smem)")
    return True, (f"ok: {use.smem_bytes / 1024:.1f} KiB smem, ~{use.regs_per_thread} regs/thread, "
                  f"{use.blocks_per_sm} blocks/SM (limited by {use.limiter})")


# ----------------------------------------------------------------------------- work

@dataclass(frozen=True)
class Cost:
    """Work of one kernel call.

    flops: nominal operations (4*B*Hq*N^2*D, halved when causal, for attention; 4*B*Hq*ctx*D for
      decode; executed elementwise ops for quantize), the figure TOPS are reported against.
    flops_by_unit: executed work per unit of UNITS (see the module docstring for each unit's count).
    bytes_read / bytes_written: DRAM traffic after L2 reuse; l2_bytes: bytes that programs load from
      or store through L2 (K/V re-reads by every query tile included).
    exps: executed exponentials; programs: grid size; iterations: inner-loop trips over all programs.
    """

    kernel: str
    flops: float
    flops_by_unit: dict
    bytes_read: float
    bytes_written: float
    l2_bytes: float
    exps: float
    programs: int
    iterations: int
    launches: int = 1
    details: dict = field(default_factory=dict)

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """Nominal ops per DRAM byte."""
        return self.flops / self.bytes if self.bytes else math.inf


def _units(**counts: float) -> dict:
    return {unit: float(counts.get(unit, 0.0)) for unit in UNITS}


def kernel_cost(kernel: str, shape: Any, config: Any = None, gpu: "str | GPUSpec" = "h100-sxm") -> Cost:
    """Operations per unit and bytes of `kernel` on `shape` with `config` (see the module docstring).

    The GPU matters for the DRAM bytes of prefill (how many programs share K/V through L2 depends on
    occupancy and L2 size) and for the decode split count when config.num_splits is None.
    """
    kernel = _check_kernel(kernel)
    shape = _as_shape(shape)
    gpu = resolve_gpu(gpu)
    knobs = _config_for(kernel, config)
    if kernel in ("prefill", "sdpa_prefill_fp16"):
        return _prefill_cost(kernel, shape, knobs, gpu)
    if kernel in ("decode", "sdpa_decode_fp16"):
        return _decode_cost(kernel, shape, knobs, gpu)
    return _quantize_cost(shape, knobs)


def _prefill_cost(kernel: str, shape: AttentionShape, knobs: dict, gpu: GPUSpec) -> Cost:
    """Prefill work. Per head: query tile i (Br rows) visits KV tiles 0..ceil(min(N, (i+1)*Br)/Bc)-1
    when causal, all ceil(N/Bc) otherwise; every visited tile is computed whole (Br x Bc scores).

    DRAM: Q once (fp16), O once (fp16), K and V (INT8 codes, fp32 tile scales) as unique bytes times
    a re-fetch factor: the programs of
    one KV head (ceil(N/Br) * Hq/Hkv of them) stream its K/V in `passes = P / concurrent` groups;
    a later group hits in L2 when the K/V of the heads in flight fit in half the L2, else misses in
    proportion: kv_dram = kv_unique * (1 + (passes - 1) * (1 - hit)). L2: every program loads the
    K/V tiles it visits, so L2 bytes fall as Br grows.
    """
    int8 = kernel == "prefill"
    e = 1 if int8 else 2
    b, hq, hkv, n, d = shape.batch, shape.num_q_heads, shape.num_kv_heads, shape.seq_len, shape.head_dim
    dp = shape.compute_head_dim  # channels loaded and multiplied (zero tail channels included)
    bm, bn = knobs["block_m"], knobs["block_n"]
    q_blocks = math.ceil(n / bm)
    tiles_per_program = [math.ceil(min(n, (i + 1) * bm) / bn) if shape.causal else math.ceil(n / bn)
                         for i in range(q_blocks)]
    tiles_per_head = sum(tiles_per_program)
    # unmasked tiles end where a tile's last key is <= the program's first row (causal), or at the
    # last full tile; the rest run in the masked loop
    if shape.causal:
        masked_per_head = sum(t - min(t, (i * bm + 1) // bn, n // bn) for i, t in enumerate(tiles_per_program))
    else:
        masked_per_head = q_blocks * (1 if n % bn else 0)
    kv_tokens_loaded_per_head = sum(min(n, t * bn) for t in tiles_per_program)
    programs = b * hq * q_blocks
    tiles_total = b * hq * tiles_per_head
    scores = tiles_total * bm * bn
    masked_scores = b * hq * masked_per_head * bm * bn
    acc_elements = tiles_total * bm * dp  # accumulator updates, one per tile
    skip = float(shape.pv_skip_fraction) if (int8 and knobs["sparsity_threshold"] is not None) else 0.0

    use = resource_usage(kernel, knobs, gpu, d)
    concurrent = gpu.sm_count * max(1, use.blocks_per_sm)
    programs_per_kv_head = q_blocks * shape.group
    passes = max(1.0, programs_per_kv_head / concurrent)
    heads_in_flight = min(b * hkv, max(1.0, concurrent / programs_per_kv_head))
    working_set = heads_in_flight * 2 * n * dp * e
    hit = min(1.0, L2_USABLE_FRACTION * gpu.l2_mb * 1e6 / working_set)

    q_bytes = b * hq * n * d * 2  # fp16 Q, quantized per tile inside the kernel (the baseline: fp16 too)
    o_bytes = b * hq * n * d * 2
    kv_unique = 2 * b * hkv * n * dp * e
    l2_kv = 2 * b * hq * kv_tokens_loaded_per_head * dp * e
    kv_dram = min(l2_kv, kv_unique * (1.0 + (passes - 1.0) * (1.0 - hit)))
    scale_bytes = 4 * 2 * b * hkv * math.ceil(n / bn) if int8 else 0  # K and V tile scales
    l2_scale_bytes = 4 * 2 * tiles_total if int8 else 0

    products = scores * 2 * dp + scores * 2 * dp * (1.0 - skip)
    if int8:
        # a skipped tile (every score under the threshold) still has its QK product and row maxima;
        # its exponentials, P, PV product and accumulator update are not run
        live = 1.0 - skip
        sas = knobs["sas_fma_fraction"] if knobs["use_sas"] else 0.0
        threshold_ops = THRESHOLD_FMA_OPS_PER_SCORE if knobs["sparsity_threshold"] is not None else 0
        sfu = live * (scores * (1.0 - sas) + scores * sas * SAS_CONVERSIONS_PER_EXP
                      + scores * CONVERSIONS_PER_SCORE + acc_elements * ACC_CONVERSIONS)
        fma = (scores * SKIP_TEST_FMA_OPS_PER_SCORE
               + live * (scores * (ELEMENTWISE_FMA_OPS_PER_SCORE - SKIP_TEST_FMA_OPS_PER_SCORE + threshold_ops)
                         + scores * sas * SAS_FMA_OPS_PER_EXP + acc_elements * ACC_UPDATE_FMA_OPS)
               + masked_scores * MASK_FMA_OPS_PER_SCORE)
        # Q quantized once per program: QUANT_FMA_OPS_PER_ELEMENT + 1 F2I per element of the tile
        q_elements = programs * bm * dp
        fma += q_elements * QUANT_FMA_OPS_PER_ELEMENT
        sfu += q_elements * QUANT_CONVERSIONS_PER_ELEMENT
        units = _units(int8_tc=products, sfu=sfu, fma=fma)
    else:
        sfu = scores + scores * FP16_CONVERSIONS_PER_SCORE
        fma = (scores * FP16_ELEMENTWISE_FMA_OPS_PER_SCORE + acc_elements * FP16_ACC_UPDATE_FMA_OPS
               + masked_scores * MASK_FMA_OPS_PER_SCORE)
        units = _units(fp16_tc=products, sfu=sfu, fma=fma)
    nominal = 4.0 * b * hq * n * n * d * (0.5 if shape.causal else 1.0)
    details = {"q_bytes": q_bytes, "o_bytes": o_bytes, "kv_unique_bytes": kv_unique, "kv_dram_bytes": kv_dram,
               "kv_l2_bytes": l2_kv, "scale_bytes": scale_bytes, "l2_hit_fraction": hit,
               "kv_passes": passes, "scores": scores, "masked_scores": masked_scores, "q_blocks": q_blocks, "pv_skip_fraction": skip}
    return Cost(kernel=kernel, flops=nominal, flops_by_unit=units, bytes_read=q_bytes + kv_dram + scale_bytes,
                bytes_written=o_bytes, l2_bytes=q_bytes + l2_kv + l2_scale_bytes + o_bytes, exps=scores,
                programs=programs, iterations=tiles_total, launches=1, details=details)


def _decode_cache_bytes_per_head(tokens_quantized: int, tokens_buffered: int, d: int, bits: int, knobs: dict) -> float:
    """Bytes of one KV head's cache that one decode step reads (kernels/cache.py layout):
    codes 2 * tokens * D * bits/8 (K and V, planar packed); K scale and zero point (int8 each) per
    channel per block of n_b tokens: 2 * D * blocks; V scale and zero point per token per v_group
    channels: 2 * tokens * ceil(D/v_group); stage-1 fp32 scales of K and V per block: 8 * blocks;
    the fp16 residual buffer: 2 * buffered * D * 2."""
    nb, vg = knobs["buffer_tokens"], knobs["v_group"]
    blocks = math.ceil(tokens_quantized / nb)
    codes = 2 * tokens_quantized * d * bits / 8
    k_meta = 2 * d * blocks
    v_meta = 2 * tokens_quantized * math.ceil(d / vg)
    stage1 = 8 * blocks
    buffer = 2 * tokens_buffered * d * 2
    return codes + k_meta + v_meta + stage1 + buffer


def _decode_cost(kernel: str, shape: AttentionShape, knobs: dict, gpu: GPUSpec) -> Cost:
    """Decode work for one step, as kernels/decode.py does it: program (split s, sequence x KV head)
    runs the Hq/Hkv query heads of its KV head at once (rows padded to max(16, next power of two)
    for tl.dot) over its share of the packed tiles; one more program per (sequence, KV head) runs
    the fp16 buffer and appends the new token; each writes fp32 partials (D values + max + sum per
    query head) that a second launch reduces.

    Bytes read: the cache (4/2-bit codes by head from bit_mix, scales and zero points, the fp16
    buffer at BUFFER_FILL_FRACTION of n_b tokens; the fp16 baseline: 2 * ctx * D * 2 per KV head),
    q, the new token's k and v, and the partials; written: o, the new k and v, the partials.
    Products: 4 * rows * D per cached token and KV head, DECODE_PRODUCT_PASSES times (hi/lo fp16).
    """
    turbo = kernel == "decode"
    b, hq, hkv, ctx, d = shape.batch, shape.num_q_heads, shape.num_kv_heads, shape.seq_len, shape.head_dim
    dp = shape.padded_head_dim
    folded = turbo and shape.group * math.ceil(d / knobs["v_group"]) <= DECODE_FOLDED_ROWS
    rows = DECODE_FOLDED_ROWS if folded else max(MMA_MIN_ROWS, 1 << (shape.group - 1).bit_length())
    bn = knobs["decode_block_n"]
    splits = decode_num_splits(shape, knobs, gpu)
    if turbo:
        nb = knobs["buffer_tokens"]
        buffered = min(ctx, int(round(BUFFER_FILL_FRACTION * nb)))
        quantized = ctx - buffered
        n_low = num_low_bit_heads(hkv, knobs["bit_mix"])
        cache = b * (n_low * _decode_cache_bytes_per_head(quantized, buffered, d, 2, knobs)
                     + (hkv - n_low) * _decode_cache_bytes_per_head(quantized, buffered, d, 4, knobs))
        parts = splits + 1  # the buffer program
        passes = 1 if folded else DECODE_PRODUCT_PASSES
    else:
        buffered, quantized, n_low = ctx, 0, 0
        cache = 2 * b * hkv * ctx * d * 2
        parts = splits
        passes = 1
    programs = b * hkv * parts
    tiles_total = b * hkv * (math.ceil(quantized / bn) + math.ceil(buffered / bn))
    q_bytes = b * hq * d * 2
    o_bytes = b * hq * d * 2
    new_kv = 2 * b * hkv * d * 2
    partials = b * hq * parts * (d + 2) * 4 if parts > 1 else 0
    bytes_read = cache + q_bytes + new_kv + partials
    bytes_written = o_bytes + new_kv + partials

    ops4, ops2 = ((FOLDED_OPS_PER_ELEMENT, FOLDED_OPS_PER_ELEMENT_2BIT) if folded
                  else (DEQUANT_FMA_OPS_PER_ELEMENT, DEQUANT_FMA_OPS_PER_ELEMENT_2BIT))
    exps = tiles_total * bn * rows
    products = tiles_total * bn * rows * dp * 4 * passes
    # a warp's share of the [rows, BLOCK_N] score tile is at least DECODE_MIN_COLUMNS_PER_WARP columns:
    # with more warps than BLOCK_N / that, the unpacked operands are built once per warp that needs them
    replication = max(1.0, knobs["decode_num_warps"] * DECODE_MIN_COLUMNS_PER_WARP / bn) ** (
        DECODE_FOLDED_REPLICATION_EXPONENT if folded else DECODE_REPLICATION_EXPONENT)
    sas = knobs["sas_fma_fraction"] if (turbo and knobs["use_sas"]) else 0.0
    sfu = exps * (1.0 - sas) + exps * sas * SAS_CONVERSIONS_PER_EXP + exps * DECODE_CONVERSIONS_PER_SCORE
    fma = (exps * DECODE_ELEMENTWISE_FMA_OPS_PER_SCORE + exps * sas * SAS_FMA_OPS_PER_EXP
           + tiles_total * rows * dp
           + (2 * b * quantized * d * replication * ((hkv - n_low) * ops4 + n_low * ops2) if turbo else 0))
    tiles_per_split = math.ceil(math.ceil(quantized / bn) / max(1, splits)) if turbo else 0
    details = {"cache_bytes": cache, "partial_bytes": partials, "num_splits": splits, "rows_per_program": rows,
               "tiles_per_split": tiles_per_split, "replication": replication,
               "tokens_quantized": quantized, "tokens_buffered": buffered, "low_bit_heads": n_low, "folded": folded}
    return Cost(kernel=kernel, flops=4.0 * b * hq * ctx * d, flops_by_unit=_units(fp16_tc=products, sfu=sfu, fma=fma),
                bytes_read=bytes_read, bytes_written=bytes_written, l2_bytes=bytes_read + bytes_written, exps=exps,
                programs=programs, iterations=tiles_total, launches=2 if (turbo or parts > 1) else 1, details=details)


def _quantize_cost(shape: AttentionShape, knobs: dict) -> Cost:
    """BPQ stage 1 of K and V, as kernels/quant.py does it (Q is quantized inside the prefill kernel).

    One program per tile of Bc rows reads its fp16 K and V rows once, takes each tile's absolute
    maximum in registers and writes the INT8 codes, padded to whole tiles of Dp = padded_head_dim
    columns (V transposed per tile, [Dp, N_pad]), and one fp32 scale per tile and tensor.
    smooth_k first reads K and Q once for the per-channel statistics (K's sum, max, min; Q's
    absolute maximum) and reduces them per KV head to the smoothing vectors ([3, Dp] fp32).
    Launches: quantize_kv, plus the statistics and smoothing kernels when smooth_k.
    """
    b, hq, hkv, n, d = shape.batch, shape.num_q_heads, shape.num_kv_heads, shape.seq_len, shape.head_dim
    bn = knobs["block_n"]
    dp = padded_head_dim(d)
    q_el, kv_el = b * hq * n * d, b * hkv * n * d
    kv_tiles = math.ceil(n / bn)
    tiles = 2 * b * hkv * kv_tiles
    smooth = bool(knobs["smooth_k"])
    bytes_read = QUANT_INPUT_BYTES * 2 * kv_el + (QUANT_INPUT_BYTES * (q_el + kv_el) if smooth else 0)
    codes_written = 2 * b * hkv * kv_tiles * bn * dp
    bytes_written = codes_written + 4 * tiles + (b * hkv * 3 * dp * 4 if smooth else 0)
    fma = 2 * kv_el * QUANT_FMA_OPS_PER_ELEMENT + ((q_el + kv_el) * SMOOTH_K_FMA_OPS_PER_ELEMENT if smooth else 0)
    sfu = 2 * kv_el * QUANT_CONVERSIONS_PER_ELEMENT
    programs = b * hkv * kv_tiles  # one program quantizes the K tile and the V tile of its rows
    details = {"elements": 2 * kv_el, "tiles": tiles, "smooth_k": smooth, "codes_written": codes_written}
    return Cost(kernel="quantize", flops=float(fma + sfu), flops_by_unit=_units(fma=fma, sfu=sfu),
                bytes_read=bytes_read, bytes_written=bytes_written, l2_bytes=bytes_read + bytes_written, exps=0.0,
                programs=programs, iterations=programs, launches=3 if smooth else 1, details=details)


# ----------------------------------------------------------------------------- prediction

def combine_roof_times(roof_times: Mapping[str, float], compute_overlap: float, memory_overlap: float,
                       loop_overhead_s: float, wave_efficiency: float, launch_overhead_s: float) -> float:
    """time = core / wave_efficiency + launch, core as in the module docstring."""
    compute_times = [roof_times.get(r, 0.0) for r in COMPUTE_ROOFS]
    top = max(compute_times)
    compute = top + (1.0 - compute_overlap) * (sum(compute_times) - top) + loop_overhead_s
    memory = roof_times.get("memory", 0.0)
    core = max(compute, memory) + (1.0 - memory_overlap) * min(compute, memory)
    return core / wave_efficiency + launch_overhead_s


@dataclass(frozen=True)
class Prediction:
    """Predicted time of one kernel call and how it was reached.

    roof_times: seconds per roof at the efficiencies used; ideal_roof_times: the same at efficiency
    1 (structural factors such as tensor-core utilisation and register pressure included), so that
    retime() can re-evaluate under other efficiencies (calibrate.fit_efficiency does).
    bound: "memory" when the memory time is at least the compute phase (the compute roofs combined
    with compute_overlap, as in combine_roof_times, overheads left out), else the largest compute
    roof. intensity: nominal ops per DRAM byte.
    """

    kernel: str
    label: str
    gpu: str
    time_s: float
    bound: str
    roof_times: dict
    ideal_roof_times: dict
    efficiency: dict
    intensity: float
    flops: float
    bytes: float
    programs: int
    concurrent_programs: int
    waves: int
    wave_efficiency: float
    compute_overlap: float
    memory_overlap: float
    loop_overhead_s: float
    launch_overhead_s: float
    resources: ResourceUsage
    cost: Cost
    source: str  # "datasheet" | "measured": which ceilings the roof times use
    critical_path_s: float = 0.0  # a floor: the serial latency of one program plus the launches (decode)

    @property
    def time_ms(self) -> float:
        return self.time_s * 1e3

    @property
    def achieved_tops(self) -> float:
        """Nominal ops per second at the predicted time, in 10^12/s."""
        return self.flops / self.time_s / 1e12

    @property
    def achieved_gbps(self) -> float:
        return self.bytes / self.time_s / 1e9

    def retime(self, efficiency: Mapping[str, float]) -> float:
        """The predicted time (s) with other efficiency factors: "<kernel>.<roof>" keys for this
        prediction's kernel win over plain roof keys; roofs missing from both keep this prediction's."""
        eff = dict(self.efficiency)
        eff.update(efficiency_for(self.kernel, efficiency, partial=True))
        times = {r: (self.ideal_roof_times[r] / eff[r] if self.ideal_roof_times[r] else 0.0) for r in ROOFS}
        return max(self.critical_path_s, combine_roof_times(times, self.compute_overlap, self.memory_overlap,
                                                            self.loop_overhead_s, self.wave_efficiency,
                                                            self.launch_overhead_s))


def check_efficiency_key(key: str) -> str:
    """A roof of ROOFS, or "<kernel>.<roof>" with the kernel in KERNELS; ValueError otherwise."""
    kernel, _, roof = key.rpartition(".")
    if roof not in ROOFS or (kernel and kernel not in KERNELS):
        raise ValueError(f"efficiency key {key!r} must be a roof {list(ROOFS)} or '<kernel>.<roof>' with a kernel "
                         f"of {list(KERNELS)}")
    return key


def efficiency_for(kernel: str, efficiency: Mapping[str, float], partial: bool = False) -> dict:
    """Per-roof factors for `kernel`: efficiency["<kernel>.<roof>"], else efficiency[roof] (roofs in
    neither are left out when `partial`, else KeyError)."""
    out = {}
    for roof in ROOFS:
        specific = f"{kernel}.{roof}"
        if specific in efficiency:
            out[roof] = float(efficiency[specific])
        elif roof in efficiency:
            out[roof] = float(efficiency[roof])
        elif not partial:
            raise KeyError(f"no efficiency factor for roof {roof!r} of kernel {kernel!r}")
    return out


def ceilings(gpu: GPUSpec, calibration: Any) -> tuple[dict, dict, str]:
    """Peak rates per unit/roof (per second) and the efficiency factors, from the datasheet or from
    a calibration (measured ceilings where present, its efficiency factors over the defaults)."""
    peaks = {"memory": gpu.hbm_gbps * 1e9, "l2": gpu.l2_gbps * 1e9, "int8_tc": gpu.int8_tops * 1e12,
             "fp16_tc": gpu.fp16_tflops * 1e12, "sfu": gpu.sfu_tops * 1e12, "fma": gpu.fma_instr_per_s}
    if calibration is None:
        return peaks, dict(DEFAULT_EFFICIENCY), "datasheet"
    cal_gpu = getattr(calibration, "gpu", gpu.key)
    if cal_gpu != gpu.key:
        raise ValueError(f"calibration is for gpu {cal_gpu!r}, not {gpu.key!r}; load the calibration of this GPU")
    source = getattr(calibration, "source", "datasheet")
    measured = {"memory": (getattr(calibration, "copy_gbps", None), 1e9),
                "int8_tc": (getattr(calibration, "int8_tops", None), 1e12),
                "fp16_tc": (getattr(calibration, "fp16_tflops", None), 1e12)}
    for roof, (value, scale) in measured.items():
        if value:
            peaks[roof] = float(value) * scale
    base = DEFAULT_EFFICIENCY_VS_MEASURED if source == "measured" else DEFAULT_EFFICIENCY
    efficiency = dict(base)
    given = {check_efficiency_key(k): float(v) for k, v in (getattr(calibration, "efficiency", None) or {}).items()}
    for key in given:  # a calibration's plain roof factor also replaces the defaults' per-kernel ones
        if key in ROOFS:
            for default_key in [k for k in efficiency if k.endswith("." + key)]:
                del efficiency[default_key]
    efficiency.update(given)
    return peaks, efficiency, source


def predict(kernel: str, shape: Any, config: Any = None, gpu: "str | GPUSpec" = "h100-sxm",
            calibration: Any = None, label: str | None = None) -> Prediction:
    """Predicted time of `kernel` on `shape` with `config` on `gpu`.

    Ideal roof times: memory = max(DRAM bytes / bandwidth, L2 bytes / L2 bandwidth); int8_tc,
    fp16_tc = ops / (peak * tc_util * reg_penalty); sfu_fma = max(sfu / sfu peak, fma / fma peak)
    / reg_penalty. Then t_r = ideal_r / efficiency_r and the time is combine_roof_times(...):
      tc_util = min(1, Br / (16 * num_warps)): each warp needs 16 rows of the query tile for its
        MMA (wgmma: 64 rows per warpgroup); fewer rows leave tensor cores idle.
      reg_penalty = REGISTER_PRESSURE_PENALTY above REGISTER_SOFT_LIMIT registers per thread.
      resident = min(blocks/SM, ceil(programs / SMs)) programs per SM;
      compute_overlap = 1 - 0.5**(COMPUTE_OVERLAP_PER_PROGRAM * (resident - 1) + async_mma): the
        tensor-core and SFU/FMA phases of one program run back to back; Hopper's asynchronous
        wgmma (async_mma = ASYNC_MMA_OVERLAP_DEPTH on cc >= 9.0) hides part of one behind the
        other (the fp16 baselines: BASELINE_OVERLAP, warp-specialised).
      memory_overlap = 1 - 0.5**(num_stages + resident - 1): each pipeline stage or resident program
        halves the exposed load time; one stage and one program per SM leave half of it exposed
        (the warps of one program still interleave loads and math a little).
      loop_overhead = (iterations * ITERATION_OVERHEAD_CYCLES + programs * PROGRAM_OVERHEAD_CYCLES)
        / (clock * SMs * resident).
      concurrent = SMs * min(blocks/SM, SATURATING_PROGRAMS_PER_SM); waves = ceil(programs /
        concurrent); wave_efficiency = programs / (waves * concurrent).
    Raises InfeasibleConfigError when check_feasible rejects the config (call it first to prune).
    """
    kernel = _check_kernel(kernel)
    shape = _as_shape(shape)
    gpu = resolve_gpu(gpu)
    knobs = _config_for(kernel, config)
    ok, reason = check_feasible(kernel, knobs, gpu, shape.head_dim)
    if not ok:
        raise InfeasibleConfigError(f"{kernel} config infeasible on {gpu.key}: {reason}")
    use = resource_usage(kernel, knobs, gpu, shape.head_dim)
    cost = kernel_cost(kernel, shape, knobs, gpu)
    peaks, all_efficiency, source = ceilings(gpu, calibration)
    efficiency = efficiency_for(kernel, all_efficiency)

    flash_backend = "FLASH" in (knobs.get("backend") or "")  # torch SDPA's FlashAttention-2 (baselines only)
    if kernel in ("prefill", "sdpa_prefill_fp16"):
        tc_util = min(1.0, knobs["block_m"] / (MMA_ROWS_PER_WARP * knobs["num_warps"]))
        if kernel == "sdpa_prefill_fp16" and flash_backend:
            tc_util *= MMA_SYNC_FRACTION  # torch's flash backend (FlashAttention-2) issues mma.sync
        stages = knobs["num_stages"]
    elif kernel in ("decode", "sdpa_decode_fp16"):
        tc_util = 1.0
        stages = knobs["decode_num_stages"]
    else:
        tc_util, stages = 1.0, 1
    reg_penalty = REGISTER_PRESSURE_PENALTY if use.regs_per_thread > REGISTER_SOFT_LIMIT or use.spills else 1.0
    units = cost.flops_by_unit
    ideal = {
        "memory": max(cost.bytes / peaks["memory"], cost.l2_bytes / peaks["l2"]),
        "int8_tc": units["int8_tc"] / (peaks["int8_tc"] * tc_util * reg_penalty),
        "fp16_tc": units["fp16_tc"] / (peaks["fp16_tc"] * tc_util * reg_penalty),
        "sfu_fma": max(units["sfu"] / peaks["sfu"], units["fma"] / peaks["fma"]) / reg_penalty,
    }
    times = {r: ideal[r] / efficiency[r] for r in ROOFS}
    resident = max(1, min(use.blocks_per_sm, math.ceil(cost.programs / gpu.sm_count)))
    if kernel.startswith("sdpa_"):
        compute_overlap = memory_overlap = BASELINE_OVERLAP
    else:
        async_mma = ASYNC_MMA_OVERLAP_DEPTH if (gpu.compute_capability >= (9, 0) and kernel != "quantize") else 0
        compute_overlap = 1.0 - 0.5 ** (COMPUTE_OVERLAP_PER_PROGRAM * (resident - 1) + async_mma)
        memory_overlap = 1.0 - 0.5 ** (stages + resident - 1)
    overlap_programs = resident if OVERHEADS_OVERLAP_ACROSS_PROGRAMS else 1
    overhead_cycles = cost.iterations * ITERATION_OVERHEAD_CYCLES + cost.programs * PROGRAM_OVERHEAD_CYCLES
    loop_s = overhead_cycles / (gpu.clock_hz * gpu.sm_count * overlap_programs)
    concurrent = gpu.sm_count * max(1, min(use.blocks_per_sm, SATURATING_PROGRAMS_PER_SM))
    waves = math.ceil(cost.programs / concurrent)
    wave_eff = cost.programs / (waves * concurrent)
    if kernel == "sdpa_decode_fp16":
        # cuDNN's and FlashAttention's split-KV decode size their grid to the GPU (their own split
        # heuristics, not kernels/decode.py's) and stream the cache: no partial last wave, and their
        # per-tile bookkeeping hides under the loads
        wave_eff = 1.0
        loop_s = 0.0
    launch_s = LAUNCH_OVERHEAD_S + (cost.launches - 1) * INTER_KERNEL_GAP_S
    time_s = combine_roof_times(times, compute_overlap, memory_overlap, loop_s, wave_eff, launch_s)
    critical_s = 0.0
    if kernel == "decode":
        # however many SMs are free, a split program runs its tiles one after another
        tiles_per_split = cost.details["tiles_per_split"]
        warp_share = (knobs["decode_block_n"] / 64) * (4 / knobs["decode_num_warps"])  # a warp's elements per tile
        latency = DECODE_TILE_LATENCY_CYCLES * (FOLDED_LATENCY_RATIO if cost.details["folded"] else 1.0)
        tile_cycles = (latency * warp_share
                       + DECODE_TILE_PREP_CYCLES * 4 / knobs["decode_num_warps"]) * cost.details["replication"]
        critical_s = (launch_s + DECODE_REDUCE_LATENCY_S
                      + (PROGRAM_OVERHEAD_CYCLES + tiles_per_split * tile_cycles) / gpu.clock_hz)
        time_s = max(time_s, critical_s)
    elif kernel == "sdpa_decode_fp16":
        # a split-KV step is two dependent kernels (split, combine), each with its load latency
        critical_s = launch_s + (SDPA_FLASH_DECODE_LATENCY_S if flash_backend else SDPA_DECODE_LATENCY_S)
        time_s = max(time_s, critical_s)
    compute_times = [times[r] for r in COMPUTE_ROOFS]
    compute_phase = max(compute_times) + (1.0 - compute_overlap) * (sum(compute_times) - max(compute_times))
    bound = "memory" if times["memory"] >= compute_phase else max(COMPUTE_ROOFS, key=lambda r: times[r])
    if label is None:
        label = f"{kernel} B={shape.batch} Hq={shape.num_q_heads} N={shape.seq_len} D={shape.head_dim}"
    return Prediction(kernel=kernel, label=label, gpu=gpu.key, time_s=time_s, bound=bound, roof_times=times,
                      ideal_roof_times=ideal, efficiency=efficiency, intensity=cost.intensity, flops=cost.flops,
                      bytes=cost.bytes, programs=cost.programs, concurrent_programs=concurrent, waves=waves,
                      wave_efficiency=wave_eff, compute_overlap=compute_overlap, memory_overlap=memory_overlap,
                      loop_overhead_s=loop_s, launch_overhead_s=launch_s, resources=use, cost=cost, source=source,
                      critical_path_s=critical_s)
