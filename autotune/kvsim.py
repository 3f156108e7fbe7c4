"""A fake-quantized TurboAttention KV cache, for measuring what the compressed cache costs in accuracy.

The cache is `kernels.cache.TurboKVCache`'s format as `kernels.reference` writes it in plain torch
(`quantize_kv_cache`, `dequantize_kv_cache`; DESIGN.md section 4, BPQ stage 2): new tokens wait in a
full-precision buffer of n_b = config.buffer_tokens tokens, and whole blocks of n_b tokens are
stored as INT8 per (sequence, head, block) (stage 1), then 4 or 2 bits (stage 2): K, smoothed by
its per-channel mean when config.smooth_k, per channel over the block's n_b tokens; V per token
over groups of config.v_group channels. Each KV head's bit width is chosen per sequence, as at
prefill, from `kv_head_priority`: the config.bit_mix fraction of heads of lowest priority get 2 bits.

Fake quantization: the cache's contents read back as fp32 (the smoothing mean added back to K, so
the values live where the model's K does) for any attention function to consume. Query i sees the
blocks before its own, j < n_b * (i // n_b), through the cache, and the keys of its own block,
n_b * (i // n_b) <= j <= i, in full precision: the 1 to n_b most recent tokens, as in a cache that
flushes when its buffer is full. This is the decode-time view of every position at once, which is
what perplexity on a text measures.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from kernels.config import KernelConfig
from kernels.reference import (assign_head_bits, dequantize_kv_cache, exact_attention, kv_head_priority,
                               kv_smoothing_mean, num_low_bit_heads, num_v_groups, quantize_kv_cache)

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""attend(q, k, v) -> [B, Hq, Nq, D]: causal attention with bottom-right alignment (Nq <= Nk)."""


class FakeQuantizedKV(NamedTuple):
    k: torch.Tensor  # fp32 [B, Hkv, N, D]: K as read back from the cache (tokens of whole blocks)
    v: torch.Tensor  # fp32 [B, Hkv, N, D]
    bits: torch.Tensor  # int32 [B, Hkv]: 4 or 2 per sequence and KV head


def fake_quantize_kv(k: torch.Tensor, v: torch.Tensor, config: KernelConfig) -> FakeQuantizedKV:
    """K and V of each sequence stored in a TurboKVCache and read back (see the module docstring).

    k, v: [B, Hkv, N, D], each row its own sequence (its own prefill, its own head bits). Tokens
    past the last whole block are still in the buffer and come back unchanged.
    """
    b, h, n, _ = k.shape
    nb = config.buffer_tokens
    k_out, v_out = k.float().clone(), v.float().clone()
    bits = torch.full((b, h), 4, dtype=torch.int32, device=k.device)
    full = (n // nb) * nb
    if full == 0:
        return FakeQuantizedKV(k_out, v_out, bits)
    lengths = torch.tensor([n], dtype=torch.int64)
    for i in range(b):
        ki, vi = k[i:i + 1], v[i:i + 1]
        mean = kv_smoothing_mean(ki, lengths) if config.smooth_k else None
        # priority of the values the cache quantizes (K smoothed); the cache smooths by the same mean
        head_bits = assign_head_bits(kv_head_priority(ki, vi, lengths, k_mean=mean), config.bit_mix)
        contents = quantize_kv_cache(ki, vi, lengths, head_bits, nb, config.v_group, config.smooth_k, k_mean=mean)
        k_deq, v_deq, _ = dequantize_kv_cache(contents)
        k_out[i, :, :full] = (k_deq[0, :, :full] + contents.k_mean[0, :, None, :].double()).float()
        v_out[i, :, :full] = v_deq[0, :, :full].float()
        bits[i] = head_bits.to(device=k.device, dtype=torch.int32)
    return FakeQuantizedKV(k_out, v_out, bits)


def history_mask(n: int, block_tokens: int, device=None) -> torch.Tensor:
    """[n, n] bool, True where query i reads key j from the cache: j's block is before i's."""
    idx = torch.arange(n, device=device)
    return (idx[None, :] // block_tokens) < (idx[:, None] // block_tokens)


def cached_exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: FakeQuantizedKV,
                           block_tokens: int, sm_scale: float | None = None) -> torch.Tensor:
    """Exact causal softmax attention in fp32 where keys of earlier blocks come from `cache`.

    q: [B, Hq, N, D]; k, v: [B, Hkv, N, D]. The isolated effect of the cache (a KIVI-style study).
    Returns fp32 [B, Hq, N, D].
    """
    b, hq, n, d = q.shape
    group = hq // k.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)

    def heads(x):
        return x.float().repeat_interleave(group, dim=1)

    qf = q.float()
    s_full = torch.matmul(qf, heads(k).transpose(-1, -2))
    s_hist = torch.matmul(qf, heads(cache.k).transpose(-1, -2))
    hist = history_mask(n, block_tokens, q.device)
    idx = torch.arange(n, device=q.device)
    causal = idx[None, :] <= idx[:, None]
    s = torch.where(hist, s_hist, s_full) * scale
    s = s.masked_fill(~causal, float("-inf"))
    p = torch.softmax(s, dim=-1)
    zero = torch.zeros((), device=q.device)
    return torch.matmul(torch.where(hist, p, zero), heads(cache.v)) + torch.matmul(torch.where(hist, zero, p), heads(v))


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: FakeQuantizedKV,
                     block_tokens: int, attend: Attend) -> torch.Tensor:
    """Causal attention by `attend` where keys of earlier blocks come from `cache`.

    One call per block of `block_tokens` queries: its keys are the cached blocks before it followed
    by its own block in full precision, with bottom-right causal alignment; so the attention
    numerics (e.g. TurboAttention's INT8 + SAS prefill) see exactly what a chunked prefill over the
    compressed cache would. Returns fp32 [B, Hq, N, D].
    """
    n = q.shape[2]
    outs = []
    for start in range(0, n, block_tokens):
        stop = min(start + block_tokens, n)
        keys = torch.cat([cache.k[:, :, :start], k[:, :, start:stop].float()], dim=2)
        values = torch.cat([cache.v[:, :, :start], v[:, :, start:stop].float()], dim=2)
        outs.append(attend(q[:, :, start:stop].float(), keys, values).float())
    return torch.cat(outs, dim=2)


def exact_attend(sm_scale: float | None) -> Attend:
    """`Attend` with fp32 exact attention."""
    return lambda q, k, v: exact_attention(q, k, v, causal=True, sm_scale=sm_scale)


# ----------------------------------------------------------------------------- size of the cache

KV_CONTEXT_TOKENS = 4096
"""Context length at which `kv_compression` is quoted (a full buffer of n_b tokens included)."""


def kv_cache_bytes(config: KernelConfig, num_kv_heads: int, head_dim: int, context: int = KV_CONTEXT_TOKENS) -> float:
    """Bytes of one sequence's cache for one layer, all metadata counted (kernels.reference's format).

    Per KV head at b bits over t packed tokens (blocks of n_b) and r buffered tokens:
    codes 2 t D b / 8 (K and V); K scale and zero point (int8 each) per channel per block,
    2 D ceil(t / n_b); V scale and zero point per token per group of v_group channels,
    2 t ceil(D / v_group); stage-1 fp32 scales of K and V per block, 8 ceil(t / n_b); the fp32
    smoothing mean of K, 4 D; the fp16 buffer, 2 r D 2. The buffer is counted full (r = n_b, or
    the whole context if shorter), the worst case.
    """
    nb = config.buffer_tokens
    buffered = min(context, nb)
    tokens = context - buffered
    blocks = math.ceil(tokens / nb)
    n_low = num_low_bit_heads(num_kv_heads, config.bit_mix)

    def head(bits: int) -> float:
        return (2 * tokens * head_dim * bits / 8 + 2 * head_dim * blocks
                + 2 * tokens * num_v_groups(head_dim, config.v_group) + 8 * blocks + 4 * head_dim
                + 2 * buffered * head_dim * 2)

    return n_low * head(2) + (num_kv_heads - n_low) * head(4)


def kv_compression(config: KernelConfig, num_kv_heads: int, head_dim: int, context: int = KV_CONTEXT_TOKENS) -> float:
    """fp16 cache bytes / compressed cache bytes at `context` tokens (see `kv_cache_bytes`)."""
    fp16 = 2 * num_kv_heads * context * head_dim * 2
    return fp16 / kv_cache_bytes(config, num_kv_heads, head_dim, context)
