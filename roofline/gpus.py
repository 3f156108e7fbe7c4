"""GPU specifications as data, and the one function that turns a GPU's name into a key.

Every figure is the dense (not 2:4-sparse) peak from NVIDIA's public datasheets and architecture
whitepapers; the source is named next to each entry. Two figures are derived rather than quoted,
and the formula is the same for every GPU:

  sfu_tops = sm_count * 16 * boost_clock
      The CUDA C++ Programming Guide, "Arithmetic Instructions", table "Throughput of Native
      Arithmetic Instructions": 32-bit reciprocal, rsqrt, log2 (__log2f), base-2 exponential
      (exp2f), sine and cosine run at 16 results per clock per multiprocessor on compute
      capability 5.x through 9.0. The same table lists 16 per clock for the 32-bit type
      conversions (I2F, F2I) that an INT8 attention kernel issues; the cost model charges both to
      this rate (see cost.py). H100 SXM check: 132 * 16 * 1.98 GHz = 4.18 T/s against the 4.1 T/s
      measured for exp2 (DESIGN.md section 8).
  l2_gbps = sm_count * (5120 / 108) B/clk * boost_clock
      The A100 whitepaper gives an L2 read bandwidth of 5120 bytes/clk for 108 SMs. NVIDIA
      publishes no L2 figure for the other parts, so the same bytes/clk per SM is applied to all:
      an estimate, used only for the L2 roof of the K/V re-reads (memory efficiency scales it).
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Mapping

logger = logging.getLogger(__name__)

SFU_OPS_PER_CLK_PER_SM = 16  # CUDA C++ Programming Guide throughput table, cc 5.x-9.0
L2_BYTES_PER_CLK_PER_SM = 5120 / 108  # A100 whitepaper: 5120 B/clk L2 bandwidth over 108 SMs


class UnknownGPUError(ValueError):
    """A GPU name that resolves to no entry of GPUS; the message lists the known keys."""


@dataclass(frozen=True)
class GPUSpec:
    """Peak rates and per-SM limits of one GPU.

    Units: *_tflops / *_tops in 10^12 operations per second (a multiply-add counts 2), dense;
    fp16_tflops is the tensor-core rate with FP32 accumulation (what attention uses; GeForce
    parts run it at half their FP16-accumulate rate). fp32_tflops is the non-tensor FMA rate
    (2 flops per FMA lane-instruction). sfu_tops is special-function results per second.
    hbm_gbps and l2_gbps in 10^9 bytes/s; l2_mb in MB; shared memory in KiB.
    smem_per_block_kb is the opt-in maximum for one block (dynamic shared memory).
    """

    key: str
    name: str
    sm_count: int
    boost_clock_mhz: float
    fp16_tflops: float
    bf16_tflops: float
    int8_tops: float
    fp8_tflops: float
    fp32_tflops: float
    sfu_tops: float
    hbm_gbps: float
    l2_mb: float
    smem_per_sm_kb: float
    smem_per_block_kb: float
    regs_per_sm: int
    max_threads_per_sm: int
    compute_capability: tuple[int, int]
    max_blocks_per_sm: int = 32
    l2_gbps: float = 0.0  # 0 = derive from L2_BYTES_PER_CLK_PER_SM (see module docstring)

    def __post_init__(self) -> None:
        positive = ("sm_count", "boost_clock_mhz", "fp16_tflops", "bf16_tflops", "int8_tops", "fp32_tflops",
                    "sfu_tops", "hbm_gbps", "l2_mb", "smem_per_sm_kb", "smem_per_block_kb", "regs_per_sm",
                    "max_threads_per_sm", "max_blocks_per_sm")
        for field_name in positive:
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"GPUSpec.{field_name} must be a positive number, got {value!r} (gpu {self.key!r})")
        if self.fp8_tflops < 0:
            raise ValueError(f"GPUSpec.fp8_tflops must be >= 0 (0 = no FP8 tensor cores), got {self.fp8_tflops!r}")
        if len(tuple(self.compute_capability)) != 2:
            raise ValueError(f"GPUSpec.compute_capability must be (major, minor), got {self.compute_capability!r}")
        object.__setattr__(self, "compute_capability", tuple(int(v) for v in self.compute_capability))
        if self.l2_gbps <= 0:
            object.__setattr__(self, "l2_gbps", l2_bandwidth_estimate_gbps(self.sm_count, self.boost_clock_mhz))

    @property
    def clock_hz(self) -> float:
        return self.boost_clock_mhz * 1e6

    @property
    def fma_instr_per_s(self) -> float:
        """FP32-pipe lane instructions per second: fp32_tflops / 2 (an FMA counts 2 flops)."""
        return self.fp32_tflops * 1e12 / 2.0

    @property
    def has_fp8(self) -> bool:
        return self.fp8_tflops > 0


def sfu_tops_from_clock(sm_count: int, boost_clock_mhz: float) -> float:
    """sm_count * 16 results/clk/SM * clock, in 10^12/s (CUDA Programming Guide throughput table)."""
    return sm_count * SFU_OPS_PER_CLK_PER_SM * boost_clock_mhz * 1e6 / 1e12


def l2_bandwidth_estimate_gbps(sm_count: int, boost_clock_mhz: float) -> float:
    """sm_count * 5120/108 B/clk * clock, in GB/s (A100 whitepaper ratio, applied to every GPU)."""
    return sm_count * L2_BYTES_PER_CLK_PER_SM * boost_clock_mhz * 1e6 / 1e9


def _spec(key, name, sm, mhz, fp16, bf16, int8, fp8, fp32, hbm, l2_mb, smem_sm, smem_block, threads, blocks, cc):
    return GPUSpec(key=key, name=name, sm_count=sm, boost_clock_mhz=mhz, fp16_tflops=fp16, bf16_tflops=bf16,
                   int8_tops=int8, fp8_tflops=fp8, fp32_tflops=fp32, sfu_tops=sfu_tops_from_clock(sm, mhz),
                   hbm_gbps=hbm, l2_mb=l2_mb, smem_per_sm_kb=smem_sm, smem_per_block_kb=smem_block,
                   regs_per_sm=65536, max_threads_per_sm=threads, compute_capability=cc, max_blocks_per_sm=blocks)


# Per-SM limits (shared memory per SM / per block, threads, resident blocks) come from the CUDA C++
# Programming Guide, "Technical Specifications per Compute Capability": cc 8.0: 164/163 KB, 2048
# threads, 32 blocks; cc 8.6: 100/99 KB, 1536 threads, 16 blocks; cc 8.9: 100/99 KB, 1536 threads,
# 24 blocks; cc 9.0: 228/227 KB, 2048 threads, 32 blocks. 64K 32-bit registers per SM on all.
_SPECS = (
    # NVIDIA A100 datasheet (2021) and A100 whitepaper: 108 SMs, 1410 MHz boost; FP16/BF16 tensor
    # 312 TFLOPS, INT8 624 TOPS (dense; 624/1248 with sparsity), FP32 19.5 TFLOPS; L2 40 MB.
    # SXM4 80GB: HBM2e 2,039 GB/s.
    _spec("a100-sxm-80gb", "NVIDIA A100-SXM4-80GB", 108, 1410, 312, 312, 624, 0, 19.5, 2039, 40, 164, 163, 2048, 32, (8, 0)),
    # SXM4 40GB: HBM2 1,555 GB/s (A100 datasheet).
    _spec("a100-sxm-40gb", "NVIDIA A100-SXM4-40GB", 108, 1410, 312, 312, 624, 0, 19.5, 1555, 40, 164, 163, 2048, 32, (8, 0)),
    # PCIe 80GB: HBM2e 1,935 GB/s; same peak tensor rates in the datasheet.
    _spec("a100-pcie-80gb", "NVIDIA A100 80GB PCIe", 108, 1410, 312, 312, 624, 0, 19.5, 1935, 40, 164, 163, 2048, 32, (8, 0)),
    # PCIe 40GB: HBM2 1,555 GB/s.
    _spec("a100-pcie-40gb", "NVIDIA A100-PCIE-40GB", 108, 1410, 312, 312, 624, 0, 19.5, 1555, 40, 164, 163, 2048, 32, (8, 0)),
    # NVIDIA H100 datasheet / Hopper whitepaper, SXM5: 132 SMs; FP16/BF16 tensor 989.4 TFLOPS, FP8
    # and INT8 1,978.9 (dense; the datasheet's 1,979/3,958 are with sparsity); FP32 66.9 TFLOPS
    # (= 132 * 128 lanes * 2 * 1.98 GHz, hence the 1980 MHz boost); HBM3 3.35 TB/s; L2 50 MB.
    _spec("h100-sxm", "NVIDIA H100 80GB HBM3", 132, 1980, 989.4, 989.4, 1978.9, 1978.9, 66.9, 3350, 50, 228, 227, 2048, 32, (9, 0)),
    # H100 PCIe datasheet: 114 SMs, FP16/BF16 tensor 756.5 TFLOPS, FP8/INT8 1,513 (dense), FP32 51.2
    # TFLOPS (= 114 * 256 * 1.755 GHz), HBM2e 2.0 TB/s, L2 50 MB.
    _spec("h100-pcie", "NVIDIA H100 PCIe", 114, 1755, 756.5, 756.5, 1513, 1513, 51.2, 2000, 50, 228, 227, 2048, 32, (9, 0)),
    # NVIDIA H200 datasheet (SXM): H100's GH100 compute (989.5 / 1,979 dense) with 141 GB HBM3e at
    # 4.8 TB/s.
    _spec("h200", "NVIDIA H200", 132, 1980, 989.4, 989.4, 1978.9, 1978.9, 66.9, 4800, 50, 228, 227, 2048, 32, (9, 0)),
    # NVIDIA L4 datasheet: FP16/BF16 tensor 242 TFLOPS and FP8/INT8 485 with sparsity -> 121 / 242.5
    # dense; FP32 30.3 TFLOPS (58 SMs * 256 * 2.04 GHz); GDDR6 300 GB/s; L2 48 MB (Ada whitepaper).
    _spec("l4", "NVIDIA L4", 58, 2040, 121, 121, 242.5, 242.5, 30.3, 300, 48, 100, 99, 1536, 24, (8, 9)),
    # NVIDIA L40S datasheet: FP16/BF16 tensor 362.05 TFLOPS, FP8/INT8 733 (dense; 733/1,466 with
    # sparsity); FP32 91.6 TFLOPS (142 SMs * 256 * 2.52 GHz); GDDR6 864 GB/s; L2 96 MB.
    _spec("l40s", "NVIDIA L40S", 142, 2520, 362.05, 362.05, 733, 733, 91.6, 864, 96, 100, 99, 1536, 24, (8, 9)),
    # A10G (AWS G5; GA102 variant, no NVIDIA datasheet): 80 SMs, 1710 MHz, FP32 35.0 TFLOPS, GDDR6
    # 600 GB/s, L2 6 MB; tensor FP16 70 TFLOPS as AWS lists it. INT8 140 TOPS is an estimate
    # (2x the FP16 rate, as on every Ampere part); calibrate before trusting it.
    _spec("a10g", "NVIDIA A10G", 80, 1710, 70, 70, 140, 0, 35.0, 600, 6, 100, 99, 1536, 16, (8, 6)),
    # Ada Lovelace whitepaper (RTX 4090): 128 SMs, 2520 MHz; FP16/BF16 tensor with FP32 accumulate
    # 165.2 TFLOPS, FP8 with FP32 accumulate 330.3, INT8 660.6 TOPS (dense); FP32 82.6 TFLOPS;
    # GDDR6X 1,008 GB/s; L2 72 MB.
    _spec("rtx4090", "NVIDIA GeForce RTX 4090", 128, 2520, 165.2, 165.2, 660.6, 330.3, 82.6, 1008, 72, 100, 99, 1536, 24, (8, 9)),
    # Ampere GA102 whitepaper (RTX 3090): 82 SMs, 1695 MHz; FP16 tensor with FP32 accumulate 71
    # TFLOPS, INT8 284 TOPS (dense); FP32 35.6 TFLOPS; GDDR6X 936 GB/s; L2 6 MB.
    _spec("rtx3090", "NVIDIA GeForce RTX 3090", 82, 1695, 71, 71, 284, 0, 35.6, 936, 6, 100, 99, 1536, 16, (8, 6)),
)

GPUS: Mapping[str, GPUSpec] = {spec.key: spec for spec in _SPECS}

# Short names people type, and the names NVML / torch.cuda.get_device_name report. Matching is on
# the token of _name_token (lower case, vendor words and separators removed), so "H100 SXM",
# "h100_sxm" and "h100-sxm" are one name.
_ALIASES: Mapping[str, str] = {
    "a100": "a100-sxm-80gb",
    "a100-80gb": "a100-sxm-80gb",
    "a100-40gb": "a100-sxm-40gb",
    "a100-sxm": "a100-sxm-80gb",
    "a100-sxm4-80gb": "a100-sxm-80gb",
    "a100-sxm4-40gb": "a100-sxm-40gb",
    "a100-pcie": "a100-pcie-80gb",
    "a100-80gb-pcie": "a100-pcie-80gb",
    "a100-pcie-80gb": "a100-pcie-80gb",
    "a100-pcie-40gb": "a100-pcie-40gb",
    "h100": "h100-sxm",
    "h100-sxm5": "h100-sxm",
    "h100-80gb-hbm3": "h100-sxm",
    "h100-sxm5-80gb": "h100-sxm",
    "h100-pcie": "h100-pcie",
    "h200": "h200",
    "h200-sxm": "h200",
    "h200-141gb-hbm3e": "h200",
    "l4": "l4",
    "l40s": "l40s",
    "a10g": "a10g",
    "4090": "rtx4090",
    "rtx-4090": "rtx4090",
    "3090": "rtx3090",
    "rtx-3090": "rtx3090",
}

_VENDOR_WORDS = ("nvidia", "geforce", "tesla")


def _name_token(name: str) -> str:
    """Lower case, drop vendor words and a MIG suffix, keep only letters and digits."""
    text = name.strip().lower()
    text = re.split(r"\bmig\b", text)[0]  # "NVIDIA A100-SXM4-40GB MIG 1g.5gb" is the A100's slice
    words = [w for w in re.split(r"[^a-z0-9]+", text) if w and w not in _VENDOR_WORDS]
    return "".join(words)


@functools.lru_cache(maxsize=None)
def _token_table() -> dict[str, str]:
    table = {}
    for key, spec in GPUS.items():
        table[_name_token(key)] = key
        table[_name_token(spec.name)] = key
    for alias, key in _ALIASES.items():
        table[_name_token(alias)] = key
    return table


def known_gpus() -> list[str]:
    return sorted(GPUS)


def normalize_gpu_name(name: str) -> str:
    """The GPUS key for a key, an alias ("a100", "4090") or a name NVML/torch reports.

    "NVIDIA H100 80GB HBM3" -> "h100-sxm", "NVIDIA A100-SXM4-40GB" -> "a100-sxm-40gb",
    "NVIDIA GeForce RTX 4090" -> "rtx4090". Raises UnknownGPUError listing the known keys.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnknownGPUError(f"gpu must be a non-empty string, got {name!r}; known GPUs: {known_gpus()}")
    key = _token_table().get(_name_token(name))
    if key is None:
        raise UnknownGPUError(
            f"unknown GPU {name!r}; known GPUs: {known_gpus()} (aliases such as 'a100', 'h100', '4090' "
            f"and the names NVML reports also work)")
    return key


def resolve_gpu(name: "str | GPUSpec") -> GPUSpec:
    """The GPUSpec for a key, alias or reported device name (a GPUSpec passes through)."""
    if isinstance(name, GPUSpec):
        return name
    return GPUS[normalize_gpu_name(name)]


def detect_gpu_name(index: int = 0) -> str | None:
    """The name of local GPU `index` from NVML (nvidia-ml-py), else torch.cuda; None without a GPU."""
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        try:
            if index < pynvml.nvmlDeviceGetCount():
                name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
                return name.decode() if isinstance(name, bytes) else str(name)
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # no driver, no library, or no device: fall through to torch
        logger.debug("NVML unavailable (%s); trying torch.cuda", exc)
    try:
        import torch

        if torch.cuda.is_available() and index < torch.cuda.device_count():
            return torch.cuda.get_device_name(index)
    except Exception as exc:
        logger.debug("torch.cuda unavailable (%s)", exc)
    return None


_warned_unknown: set[str] = set()


def detect_gpu(index: int = 0) -> str | None:
    """The GPUS key of local GPU `index`, or None without a GPU or for a GPU not in the table
    (warned once, naming the device, so that callers can fall back to a default)."""
    name = detect_gpu_name(index)
    if name is None:
        return None
    try:
        return normalize_gpu_name(name)
    except UnknownGPUError:
        if name not in _warned_unknown:
            _warned_unknown.add(name)
            logger.warning("GPU %r is not in roofline.GPUS (known: %s); no specification for it", name, known_gpus())
        return None
