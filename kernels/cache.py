"""TurboKVCache: a KV cache compressed to 4/2 bits per head (BPQ stage 2), with a split-KV decode.

    cache = TurboKVCache(batch, num_kv_heads, head_dim, max_len, device="cuda", dtype=torch.float16)
    cache.prefill(k, v)                 # prompt [B, Hkv, N, D]; per-head bits chosen here
    o = cache.decode(q, k_new, v_new)   # q [B, Hq, 1, D]; k_new, v_new [B, Hkv, 1, D]
    cache.nbytes()                      # bytes held, every scale, map and buffer included

Storage (kernels/reference.py, "KV cache and decode", has the format; kernels/decode.py the
kernels). n_b = config.buffer_tokens, NBLK = max_len // n_b blocks per sequence and head,
NG = ceil(D / v_group), H4 / H2 the KV heads held at 4 / 2 bits (H4 + H2 = Hkv):
  pool4 / pool2 (one per bit width, heads indexed by `head_slot`):
    K codes, V codes   uint8 [B, Hp, NBLK, n_b, D * bits / 8]   planar packing
    K scale, K zero    int8  [B, Hp, NBLK, D]                   per channel over the block
    V scale, V zero    int8  [B, Hp, NBLK, n_b, NG]             per token over channel groups
  stage-1 scales       fp32  [B, Hkv, NBLK] for K and for V     symmetric INT8 per block
  K mean (smoothing)   fp32  [B, Hkv, D]                        only when config.smooth_k
  residual buffer      dtype [B, Hkv, n_b, D] for K and for V   raw fp16/bf16 tokens
  lengths              int32 [B];  head_bits, head_slot  int32 [Hkv]
so that, with e = 2 (fp16/bf16) and smooth = config.smooth_k,

  nbytes = B * NBLK * n_b * D * (H4 + H2 / 2)       (K and V codes: 2 * D * bits / 8 per token)
         + 2 * B * Hkv * NBLK * D                   (K scale + zero)
         + 2 * B * Hkv * NBLK * n_b * NG            (V scale + zero)
         + 8 * B * Hkv * NBLK                       (stage-1 scales)
         + 4 * B * Hkv * D * smooth                 (K mean)
         + 2 * e * B * Hkv * n_b * D                (buffers)
         + 4 * B + 8 * Hkv                          (lengths, head_bits, head_slot)

(`expected_nbytes` computes it). The split-KV partials of a decode step are a per-call workspace
(4 * B * Hq * (splits + 1) * (D + 2) bytes), not held, and not counted.

Semantics and choices:
- Stage 2 rounds ties to the even code (reference.quantize_lowbit_even): quantize_lowbit's
  ties-up rule has a +1/2 bias on the INT8 grid that long, flat attention does not average
  away (cosine vs exact at 32k tokens, 4-bit: 0.79 with it, 0.99 without).
- K smoothing (config.smooth_k): packed K is stored minus its per-channel mean over the prompt
  (per sequence and head; it cancels in softmax for every query). On outlier inputs it lowers the
  decode error (cosine vs exact 0.985 -> 0.989 at 4 bits); the buffer keeps raw K and the kernel
  subtracts q . mu there. The channel balance that the prefill kernel also does is not used: decode
  queries are not quantized, and it did not lower the cache's error measurably.
- Head bits: at each prefill, priority = reference.kv_head_priority (gap x std of K and of V, each
  normalised over heads) and reference.assign_head_bits(priority, config.bit_mix). The priorities
  and the smoothing mean come from one Triton statistics pass over the prompt
  (kernels.quant.channel_statistics: per-chunk sums, sums of squares, maxima, minima) reduced in
  float64 (kernels.quant.head_moments), and the assignment is made on the device
  (kernels.quant.assign_bits_from_moments; no host synchronisation); the pass reads V only when the
  priorities decide (bit_mix sends some but not all heads to 2 bits and nothing is pinned). `bits=` on
  prefill, or `pin_bits` / `load_bits(path)` (JSON {"bits": [4, 2, ...]}), pin the assignment.
  Pools are preallocated for max_len at construction for floor(bit_mix * Hkv) 2-bit heads; a pinned
  assignment with another count reallocates them (at prefill, never during decode).
- Flush: eager. After every call a sequence holds lengths // n_b packed blocks and lengths % n_b
  buffer tokens; decode appends, flushes a buffer that just filled, then attends.
- Filled by the prefill: `kernels.turbo_attention(q, k, v, kv_cache=cache)` stores the prompt
  exactly as `cache.prefill(k, v)` would (`planned_bits`, `begin_prefill`, then the prefill's own
  quantization pass writes the blocks and the buffer), so K and V are read once for both.
- Decode before any prefill is allowed: it starts from an empty context (lengths 0, no smoothing
  mean). Without calibration data all priorities are equal, so the first floor(bit_mix * Hkv) heads
  take 2 bits unless an assignment was pinned.
- A decode step needs no host synchronisation: lengths live on the device (the reduction kernel
  advances them) and a host mirror decides flushes and the split count.
"""

from __future__ import annotations

import json
import math
import pathlib

import torch
import triton

from . import reference as R
from .checks import check_config, check_kernel_device, check_sm_scale, check_tensor
from .config import KernelConfig
from .quant import assign_bits_from_moments, channel_statistics, head_moments
from .decode import (APPEND_NUM_WARPS, FOLDED_ROWS, INTERPRETER_SMS, QUANT_NUM_WARPS, REDUCE_NUM_WARPS, REDUCE_TILE_ELEMS,
                     _append_kernel, _decode_reduce_kernel, _decode_split_kernel, _quantize_blocks_kernel,
                     decode_num_splits, decode_tile_tokens)

CACHE_HEAD_DIMS = (64, 80, 96, 128)
CACHE_DTYPES = (torch.float16, torch.bfloat16)
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BITS_SCHEMA_VERSION = 1


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def expected_nbytes(batch: int, num_kv_heads: int, head_dim: int, max_len: int, config: KernelConfig,
                    num_2bit_heads: int, dtype: torch.dtype = torch.float16) -> int:
    """The nbytes formula of the module docstring."""
    nb = config.buffer_tokens
    nblk = max_len // nb
    ng = R.num_v_groups(head_dim, config.v_group)
    h4, h2 = num_kv_heads - num_2bit_heads, num_2bit_heads
    b, h, d = batch, num_kv_heads, head_dim
    e = torch.empty((), dtype=dtype).element_size()
    return (b * nblk * nb * d * (2 * h4 + h2) // 2
            + 2 * b * h * nblk * d
            + 2 * b * h * nblk * nb * ng
            + 8 * b * h * nblk
            + 4 * b * h * d * int(config.smooth_k)
            + 2 * e * b * h * nb * d
            + 4 * b + 8 * h)


def _bits_list(bits, num_heads: int, name: str = "bits") -> list[int]:
    if isinstance(bits, torch.Tensor):
        if bits.dim() != 1 or bits.dtype.is_floating_point or bits.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor of {num_heads} entries, got "
                            f"{bits.dtype} shape {tuple(bits.shape)}")
        values = [int(x) for x in bits.tolist()]
    elif isinstance(bits, (list, tuple)):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in bits):
            raise TypeError(f"{name} must hold ints (4 or 2), got {bits!r}")
        values = list(bits)
    else:
        raise TypeError(f"{name} must be a tensor or list of {num_heads} ints (4 or 2), got {type(bits).__name__}")
    if len(values) != num_heads:
        raise ValueError(f"{name} must have one entry per KV head ({num_heads}), got {len(values)}")
    if any(x not in (2, 4) for x in values):
        raise ValueError(f"{name} entries must be 4 or 2, got {values}")
    return values


class TurboKVCache:
    """A batch of KV caches at 4/2 bits per KV head with an fp16/bf16 residual buffer (module docstring).

    batch, num_kv_heads, head_dim (64, 80, 96 or 128), max_len: the geometry, preallocated.
    device: CUDA (or CPU under TRITON_INTERPRET=1); dtype: fp16 or bf16 (the buffer's dtype).
    config: KernelConfig (bit_mix, buffer_tokens, v_group, smooth_k, decode launch parameters);
    None -> kernels.load_config(head_dim=head_dim).
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, max_len: int, device=None,
                 dtype: torch.dtype = torch.float16, config: KernelConfig | None = None):
        self.batch = _check_positive_int("batch", batch)
        self.num_kv_heads = _check_positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = _check_positive_int("head_dim", head_dim)
        if head_dim not in CACHE_HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {list(CACHE_HEAD_DIMS)}, got {head_dim}")
        self.max_len = _check_positive_int("max_len", max_len)
        if dtype not in CACHE_DTYPES:
            raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        self.dtype = dtype
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must name a torch device, got {device!r}") from exc
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        check_kernel_device(self.device, "device must be a CUDA device")
        config = check_config(config)
        if config is None:
            from .loader import load_config

            config = load_config(head_dim=head_dim)
        self.config = config
        self.block_tokens = config.buffer_tokens
        self.num_blocks = max_len // self.block_tokens
        self.num_v_groups = R.num_v_groups(head_dim, config.v_group)
        self.smooth = config.smooth_k
        self.decode_block_n = decode_tile_tokens(config.decode_block_n, self.block_tokens)
        self._num_sms = _num_sms(self.device)  # queried once, not on every decode step
        self._pinned: list[int] | None = None

        b, h, d, nb, nblk = batch, num_kv_heads, head_dim, self.block_tokens, self.num_blocks
        z = dict(device=self.device)
        self.k_s1 = torch.zeros(b, h, nblk, dtype=torch.float32, **z)
        self.v_s1 = torch.zeros(b, h, nblk, dtype=torch.float32, **z)
        self.k_mean = torch.zeros(b, h, d, dtype=torch.float32, **z) if self.smooth else None
        self.k_buffer = torch.zeros(b, h, nb, d, dtype=dtype, **z)
        self.v_buffer = torch.zeros(b, h, nb, d, dtype=dtype, **z)
        self.lengths_dev = torch.zeros(b, dtype=torch.int32, **z)
        self._lengths = [0] * b  # host mirror: decides flushes and split counts without a sync
        self.head_bits_dev = torch.zeros(h, dtype=torch.int32, **z)
        self.head_slot_dev = torch.zeros(h, dtype=torch.int32, **z)
        self.pool4 = self.pool2 = None
        self._bits = None
        self.priority = None  # fp32 [H] on the device: the priorities of the last assignment made there
        self._set_bits(R.assign_head_bits(torch.zeros(h), config.bit_mix).tolist())

    # ------------------------------------------------------------------ bits and pools

    def _alloc_pool(self, heads: int, bits: int) -> R.PackedKV:
        return R.empty_packed_kv(self.batch, heads, self.num_blocks, self.block_tokens, self.head_dim, bits,
                                 self.config.v_group, self.device)

    def _alloc_pools(self, h4: int, h2: int) -> None:
        if self.pool4 is None or self.pool4.k_codes.shape[1] != h4:
            self.pool4 = self.pool2 = None  # free before allocating the new pools
            self.pool4 = self._alloc_pool(h4, 4)
            self.pool2 = self._alloc_pool(h2, 2)

    def _set_bits(self, bits: list[int]) -> None:
        if self._bits is not None and self._bits == list(bits):
            return  # already on the device (a copy from pageable memory would wait for the GPU)
        h2 = sum(1 for x in bits if x == 2)
        self._alloc_pools(len(bits) - h2, h2)
        self._bits = list(bits)
        self.head_bits_dev.copy_(torch.tensor(bits, dtype=torch.int32))
        self.head_slot_dev.copy_(torch.tensor(R.head_slots(bits), dtype=torch.int32))

    @property
    def head_bits(self) -> list[int]:
        """Bits per KV head (4 or 2) of the current assignment (read back from the device, once,
        after a prefill that assigned them there)."""
        if self._bits is None:
            self._bits = [int(x) for x in self.head_bits_dev.tolist()]
        return list(self._bits)

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens held per sequence (a CPU int64 tensor; no device synchronisation)."""
        return torch.tensor(self._lengths, dtype=torch.int64)

    def pin_bits(self, bits) -> None:
        """Pin the per-head bits for the following prefills (None: back to priority + bit_mix)."""
        self._pinned = None if bits is None else _bits_list(bits, self.num_kv_heads)

    def load_bits(self, path) -> list[int]:
        """Pin the assignment from a calibration file: JSON {"bits": [4, 2, ...]} (one entry per KV head;
        optional "schema_version": 1, "num_kv_heads"). Returns the pinned bits."""
        data = json.loads(pathlib.Path(path).read_text())
        if not isinstance(data, dict) or "bits" not in data:
            raise ValueError(f"{path}: expected a JSON object with a 'bits' list, got {type(data).__name__}")
        version = data.get("schema_version", BITS_SCHEMA_VERSION)
        if version != BITS_SCHEMA_VERSION:
            raise ValueError(f"{path}: unsupported schema_version {version!r} (expected {BITS_SCHEMA_VERSION})")
        if "num_kv_heads" in data and data["num_kv_heads"] != self.num_kv_heads:
            raise ValueError(f"{path}: file is for {data['num_kv_heads']} KV heads, cache has {self.num_kv_heads}")
        self.pin_bits(_bits_list(data["bits"], self.num_kv_heads, name=f"{path}: bits"))
        return list(self._pinned)

    def save_bits(self, path) -> None:
        """Write the current assignment as a calibration file that `load_bits` reads."""
        doc = {"schema_version": BITS_SCHEMA_VERSION, "num_kv_heads": self.num_kv_heads, "bits": self.head_bits}
        pathlib.Path(path).write_text(json.dumps(doc, indent=1) + "\n")

    # ------------------------------------------------------------------ accounting

    def _held(self) -> list[torch.Tensor]:
        held = [*self.pool4, *self.pool2, self.k_s1, self.v_s1, self.k_buffer, self.v_buffer,
                self.lengths_dev, self.head_bits_dev, self.head_slot_dev]
        if self.k_mean is not None:
            held.append(self.k_mean)
        return held

    def nbytes(self) -> int:
        """Bytes held on the device: codes, scales, zero points, stage-1 scales, mean, buffers,
        lengths and bit maps (the module docstring's formula)."""
        return sum(t.numel() * t.element_size() for t in self._held())

    def fp16_nbytes(self) -> int:
        """Bytes of a plain fp16 K and V cache of the same geometry (for kv_compression)."""
        return 2 * self.batch * self.num_kv_heads * self.max_len * self.head_dim * 2

    def contents(self) -> R.KVCacheContents:
        """The stored state (views, not copies), for reference.decode_attention_reference."""
        d = self.head_dim
        mean = self.k_mean if self.k_mean is not None else torch.zeros(self.batch, self.num_kv_heads, d, device=self.device)
        return R.KVCacheContents(self.pool4, self.pool2, self.head_bits_dev, self.head_slot_dev, self.k_s1, self.v_s1,
                                 mean, self.k_buffer, self.v_buffer, self.lengths_dev.clone(), self.block_tokens,
                                 self.config.v_group)

    # ------------------------------------------------------------------ prefill

    def _check_kv(self, k, v, names=("k", "v"), decode: bool = False) -> int:
        """Validate a K/V pair [B, Hkv, N, D] against the cache (N == 1 for decode); return N."""
        kn, vn = names
        for name, x in ((kn, k), (vn, v)):
            check_tensor(name, x, ndim=4, dtypes=INPUT_DTYPES)
            if x.device != self.device:
                raise ValueError(f"{name} must be on the cache's device {self.device}, got {x.device}")
        if v.dtype != k.dtype:
            raise TypeError(f"{kn} and {vn} must share one dtype, got {kn}={k.dtype}, {vn}={v.dtype}")
        b, h, n, d = k.shape
        if (b, h, d) != (self.batch, self.num_kv_heads, self.head_dim):
            raise ValueError(f"{kn} must be [B={self.batch}, Hkv={self.num_kv_heads}, {'1' if decode else 'N'}, "
                             f"D={self.head_dim}], got {tuple(k.shape)}")
        if tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"{vn} must have the shape of {kn} {tuple(k.shape)}, got {tuple(v.shape)}")
        if decode and n != 1:
            raise ValueError(f"{kn} and {vn} must have 1 token in dim 2 (one new token per sequence), got {n}")
        for name, x in ((kn, k), (vn, v)):
            if x.stride(-1) != 1:
                raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {tuple(x.stride())}")
        return n

    def _check_lengths(self, lengths, n: int) -> list[int]:
        if lengths is None:
            return [n] * self.batch
        if not isinstance(lengths, torch.Tensor):
            raise TypeError(f"lengths must be a torch.Tensor of {self.batch} ints or None, got {type(lengths).__name__}")
        if lengths.dim() != 1 or lengths.numel() != self.batch:
            raise ValueError(f"lengths must have shape [{self.batch}], got {tuple(lengths.shape)}")
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
            raise TypeError(f"lengths must have an integer dtype, got {lengths.dtype}")
        values = [int(x) for x in lengths.tolist()]
        bad = [x for x in values if not 0 <= x <= n]
        if bad:
            raise ValueError(f"lengths must be in [0, {n}] (the prompt's N), got {values}")
        return values

    def prefill(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None, bits=None) -> None:
        """Quantize and store a prompt, replacing whatever the cache held.

        k, v: [B, Hkv, N, D] (fp16, bf16 or fp32; views with a contiguous last dim are fine and are
        not modified), 1 <= N <= max_len. lengths: optional int tensor [B], sequence b's prompt is
        its first lengths[b] tokens (default N). bits: optional per-head bits (4/2) pinning the
        assignment for this prompt (else the pinned file, else priority + config.bit_mix).
        """
        n = self._check_kv(k, v)
        if n < 1 or n > self.max_len:
            raise ValueError(f"k and v must have 1 <= N <= max_len ({self.max_len}) tokens in dim 2, got {n}")
        lens = self._check_lengths(lengths, n)
        if bits is not None:
            bits = _bits_list(bits, self.num_kv_heads)
        bits = self.planned_bits(bits)
        self.set_lengths(lens)
        stats = None
        if self.smooth or bits is None:
            stats = channel_statistics(None, k, v if bits is None else None, triton.next_power_of_2(self.head_dim),
                                       sumsq=bits is None, lengths=self.lengths_dev)
        self.begin_prefill(bits, stats)
        if max(lens) == 0:
            return
        nb = self.block_tokens
        grid = (2 * triton.cdiv(max(lens), nb), self.batch * self.num_kv_heads)  # K and V programs per block
        self._launch_quantize(grid, k, v, flush=False)

    def planned_bits(self, bits=None) -> list[int] | None:
        """The per-head bits a prefill will use where the prompt does not decide them: `bits`, else
        the pinned assignment, else all 4 (or all 2) when config.bit_mix sends no (every) head to
        2 bits. None: the prompt's head priorities decide (begin_prefill needs its statistics)."""
        if bits is None:
            bits = self._pinned
        if bits is None:
            h = self.num_kv_heads
            n_low = R.num_low_bit_heads(h, self.config.bit_mix)
            if n_low in (0, h):
                return [2 if n_low else 4] * h
        return None if bits is None else list(bits)

    def set_lengths(self, lens: list[int]) -> None:
        """The tokens each sequence holds (device tensor and host mirror), as a prefill sets them."""
        if len(set(lens)) == 1:
            self.lengths_dev.fill_(lens[0])
        else:
            self.lengths_dev.copy_(torch.tensor(lens, dtype=torch.int32))
        self._lengths = list(lens)

    def begin_prefill(self, bits: list[int] | None, stats) -> None:
        """After `set_lengths`: set the state that the prompt is then stored into: the smoothing mean
        (config.smooth_k) and, when bits is None, the head bits from the priorities, both from
        `stats` (kernels.quant.channel_statistics of the prompt: K, plus V with sums of squares when
        bits is None). The assignment is made on the device (no host synchronisation; `head_bits`
        reads it back when asked). The caller then launches the kernel that stores the blocks (this
        cache's `prefill`, or the prefill attention's quantization pass)."""
        if self.smooth or bits is None:
            mom = head_moments(stats, self.lengths_dev, self.k_mean, priority=bits is None)
        if bits is None:
            h = self.num_kv_heads
            n_low = R.num_low_bit_heads(h, self.config.bit_mix)
            self._alloc_pools(h - n_low, n_low)
            if self.priority is None:
                self.priority = torch.empty(h, dtype=torch.float32, device=self.device)
            assign_bits_from_moments(mom, n_low, sum(self._lengths) * self.head_dim, self.priority, self.head_bits_dev,
                                     self.head_slot_dev)
            self._bits = None  # on the device only, until head_bits is read
        else:
            self._set_bits(bits)

    def kernel_state_args(self) -> tuple:
        """The cache's tensors as the quantize and split kernels take them: LEN, MEAN, HEAD_BITS,
        HEAD_SLOT, the 4-bit pool, the 2-bit pool, KS1, VS1, KBUF, VBUF."""
        p4, p2 = self.pool4, self.pool2
        p2 = p2 if p2.k_codes.shape[1] else p4  # an empty pool is never read: pass a valid pointer
        p4 = p4 if p4.k_codes.shape[1] else p2
        mean = self.k_mean if self.k_mean is not None else self.k_s1  # never read without HAS_MEAN
        return (self.lengths_dev, mean, self.head_bits_dev, self.head_slot_dev, *p4, *p2,
                self.k_s1, self.v_s1, self.k_buffer, self.v_buffer)

    def kernel_head_args(self) -> tuple[int, int, int, int]:
        """(H, H4, H2, NBLK) of the kernels."""
        return self.num_kv_heads, self.pool4.k_codes.shape[1], self.pool2.k_codes.shape[1], self.num_blocks

    def _launch_quantize(self, grid, k, v, flush: bool) -> None:
        d = self.head_dim
        _quantize_blocks_kernel[grid](
            k, v, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            *self.kernel_state_args(), *self.kernel_head_args(),
            D=d, DP=triton.next_power_of_2(d), NB=self.block_tokens, NBP=triton.next_power_of_2(self.block_tokens),
            VG=self.config.v_group, NG=self.num_v_groups, FLUSH=flush, HAS_MEAN=self.k_mean is not None,
            num_warps=QUANT_NUM_WARPS)

    # ------------------------------------------------------------------ decode

    def _check_decode(self, q, k_new, v_new, sm_scale) -> None:
        check_tensor("q", q, ndim=4, dtypes=INPUT_DTYPES)
        self._check_kv(k_new, v_new, names=("k_new", "v_new"), decode=True)
        if q.device != self.device:
            raise ValueError(f"q must be on the cache's device {self.device}, got {q.device}")
        if k_new.dtype != q.dtype:
            raise TypeError(f"q, k_new and v_new must share one dtype, got q={q.dtype}, k_new={k_new.dtype}")
        b, hq, nq, d = q.shape
        if b != self.batch or nq != 1 or d != self.head_dim:
            raise ValueError(f"q must be [B={self.batch}, Hq, 1, D={self.head_dim}], got {tuple(q.shape)}")
        if hq % self.num_kv_heads:
            raise ValueError(f"q's head count ({hq}) must be a multiple of the cache's KV heads ({self.num_kv_heads}) for GQA")
        if q.stride(-1) != 1:
            raise ValueError(f"q must be contiguous in its last dim (stride 1), got strides {tuple(q.stride())}")
        check_sm_scale(sm_scale)
        full = [i for i, n in enumerate(self._lengths) if n + 1 > self.max_len]
        if full:
            raise ValueError(f"decode would grow sequence(s) {full} past max_len={self.max_len}")

    def decode(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
        """Append one token per sequence and attend: softmax(q K^T * sm_scale) V over every held token.

        q: [B, Hq, 1, D] with Hq a multiple of Hkv; k_new, v_new: [B, Hkv, 1, D]; one dtype (fp16,
        bf16 or fp32); views with a contiguous last dim are fine. Returns [B, Hq, 1, D] in q's dtype.
        """
        self._check_decode(q, k_new, v_new, sm_scale)
        return self._step(q, k_new, v_new, sm_scale, commit=True)

    def _split_plan(self, new_lengths: list[int]) -> tuple[int, int]:
        """(number of packed splits, tiles per split) for a step that ends at new_lengths."""
        nb, block_n = self.block_tokens, self.decode_block_n
        max_tiles = (max(new_lengths) // nb) * (nb // block_n)
        splits = decode_num_splits(max_tiles, self.batch * self.num_kv_heads, self._num_sms, self.config.num_splits)
        if splits == 0:
            return 0, 1
        per_split = triton.cdiv(max_tiles, splits)
        return triton.cdiv(max_tiles, per_split), per_split

    def _step(self, q, k_new, v_new, sm_scale=None, commit: bool = True) -> torch.Tensor:
        """The kernels of one decode step (inputs already validated). commit=False leaves the lengths
        as they were, so the step can be replayed (the benchmark times it that way).

        A step without a flush is two launches: the split kernel (whose buffer program appends the
        new token) and the reduction. A step where some buffer fills appends first, flushes, then
        runs the same two kernels without the append.
        """
        b, hq, _, d = q.shape
        h, nb = self.num_kv_heads, self.block_tokens
        dp = triton.next_power_of_2(d)
        new_lengths = [n + 1 for n in self._lengths]
        flush = any(n % nb == 0 for n in new_lengths)
        if flush:
            _append_kernel[(b * h,)](k_new, v_new, k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
                                     self.k_buffer, self.v_buffer, self.lengths_dev, h, NB=nb, D=d, DP=dp,
                                     num_warps=APPEND_NUM_WARPS)
            self._launch_quantize((1, b * h), self.k_buffer, self.v_buffer, flush=True)
        splits, per_split = self._split_plan(new_lengths)
        parts = splits + 1
        pm = torch.empty(b, hq, parts, device=self.device, dtype=torch.float32)
        pl = torch.empty_like(pm)
        pacc = torch.empty(b, hq, parts, d, device=self.device, dtype=torch.float32)
        group = hq // h
        block_g = max(16, triton.next_power_of_2(group))
        scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
        _decode_split_kernel[(parts, b * h)](
            q, q.stride(0), q.stride(1), k_new, v_new, k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
            *self.kernel_state_args(), pm, pl, pacc, scale * R.LOG2E, *self.kernel_head_args(), splits, per_split,
            G=group, BLOCK_G=block_g, D=d, DP=dp, NB=nb, BLOCK_N=self.decode_block_n,
            VG=self.config.v_group, NG=self.num_v_groups, HAS_MEAN=self.k_mean is not None, APPEND=not flush,
            FAST=self.device.type == "cuda", PV_HILO=q.dtype == torch.float32, INT8_QK=self.folded_decode(hq),
            QK_SPLIT=self.decode_score_bits(q.dtype, hq) == 16, BLOCK_R=FOLDED_ROWS,
            num_warps=self.config.decode_num_warps, num_stages=self.config.decode_num_stages)
        out = torch.empty((b, hq, 1, d), device=self.device, dtype=q.dtype)
        chunk = min(triton.next_power_of_2(parts), max(1, REDUCE_TILE_ELEMS // dp))
        _decode_reduce_kernel[(b * hq,)](pm, pl, pacc, out, out.stride(0), out.stride(1), self.lengths_dev, hq, parts,
                                         D=d, DP=dp, CHUNK=chunk, COMMIT=commit,
                                         num_warps=REDUCE_NUM_WARPS)
        if commit:
            self._lengths = new_lengths
        return out

    def folded_decode(self, hq: int) -> bool:
        """Whether packed tiles run the INT8-score kernel (kernels.decode._packed_split_i8): when the
        (query head, V group) rows of a KV head fit one 16-row tile; otherwise fp16 products."""
        return (hq // self.num_kv_heads) * self.num_v_groups <= FOLDED_ROWS

    def decode_score_bits(self, q_dtype: torch.dtype, hq: int) -> int | None:
        """The `score_bits` of reference.decode_attention_reference that models a decode step with
        queries of this dtype: 8 or 16 on the INT8-score kernel, None (exact q') otherwise."""
        if not self.folded_decode(hq):
            return None
        return 16 if self.config.decode_q_split or q_dtype == torch.float32 else 8

    def decode_bytes_read(self, hq: int) -> int:
        """Bytes one decode step (no flush) reads from device memory at the current lengths: for each
        sequence and KV head, the codes, scales and zero points of every packed block with its two
        stage-1 scales, the buffer tokens, the mean; plus q, k_new and v_new, and the split partials
        that the reduction reads back. (Writes, a few hundred bytes per head, are not counted.)"""
        d, nb, ng = self.head_dim, self.block_tokens, self.num_v_groups
        e = self.k_buffer.element_size()
        new_lengths = [n + 1 for n in self._lengths]
        per_block = {bits: 2 * nb * d * bits // 8 + 2 * d + 2 * nb * ng + 8 for bits in (4, 2)}
        total = 0
        for n in new_lengths:
            full, rest = n // nb, n % nb
            total += sum(full * per_block[bits] + 2 * (rest - 1) * d * e for bits in self.head_bits)
        h = self.num_kv_heads
        parts = self._split_plan(new_lengths)[0] + 1
        total += self.batch * (hq * d * e + 2 * h * d * e + 4 * h * d * int(self.smooth) + hq * parts * (d + 2) * 4)
        return total
