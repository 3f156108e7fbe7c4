"""The prefill's packed-KV-cache by-product: turbo_attention(q, k, v, kv_cache=cache).

What is checked, and why the checks are exact:
- the cache filled by the prefill's quantization pass holds exactly what `cache.prefill(k, v)`
  stores (every tensor of its state, bit for bit): both take the smoothing mean and the head
  priorities from the same Triton statistics pass and quantize blocks with the same jitted code;
  tests/test_cache.py checks `cache.prefill` itself against `reference.quantize_kv_cache`;
- the attention output is bit-identical with and without the cache (the by-product only adds stores);
- decoding from the filled cache matches `reference.decode_attention_reference` on its contents
  (SQNR >= 65 dB with fp16 q, as in tests/test_cache.py) and exact attention over the history;
- the statistics-pass priorities and mean match `reference.kv_head_priority` / `kv_smoothing_mean`:
  float64 over fp32 per-chunk partials, so to PRIORITY_RTOL (fp32 sums of squares over 256-row
  chunks);
- a bad kv_cache raises before any launch and leaves the cache as it was.
"""

import pytest
import torch

from kernels import reference as R
from kernels.config import KernelConfig

SQNR_VS_REF_FP16_DB = 65.0
COSINE_4BIT_VS_EXACT = 0.975  # one step of 4 heads, 4-bit K/V, INT8 scores: measured 0.979-0.990 (0.981-0.989 with exact q')
PRIORITY_RTOL = 1e-4


def _api():
    from kernels.cache import TurboKVCache
    from kernels.prefill import turbo_attention

    return turbo_attention, TurboKVCache


def _assert_same_state(a, b):
    for name, x, y in zip(a._fields, a, b):
        if isinstance(x, tuple):
            for field, xx, yy in zip(x._fields, x, y):
                assert torch.equal(xx, yy), (name, field)
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name
        else:
            assert x == y, name


CASES = [
    # (b, hq, hkv, n, d, prefill block_n, cache buffer_tokens, bit_mix, cache smooth_k, prefill smooth_k)
    (1, 4, 2, 150, 64, 32, 64, 0.5, True, True),  # cache blocks span two prefill tiles
    (2, 2, 2, 200, 96, 128, 32, 0.5, True, True),  # four cache blocks per prefill tile, partial buffer
    (1, 7, 1, 64, 128, 16, 64, 0.0, False, True),  # GQA 7:1, exactly one block, empty buffer
    (1, 2, 1, 1, 80, 64, 64, 1.0, True, False),  # one token: buffer only; cache smooths, prefill not
    (3, 4, 4, 97, 64, 64, 16, 0.25, False, False),  # B = 3: a statistics pass for the priorities only
]


@pytest.mark.parametrize("b,hq,hkv,n,d,bn,nb,mix,cache_smooth,smooth", CASES)
def test_prefill_fills_the_cache_like_cache_prefill(b, hq, hkv, n, d, bn, nb, mix, cache_smooth, smooth, device):
    turbo_attention, TurboKVCache = _api()
    q, k, v = R.outlier_qkv(b, hq, hkv, n, d, device=device, seed=n + d)
    pcfg = KernelConfig(block_m=32, block_n=bn, num_warps=4, num_stages=1, smooth_k=smooth)
    ccfg = KernelConfig(buffer_tokens=nb, bit_mix=mix, smooth_k=cache_smooth, num_splits=2)
    filled = TurboKVCache(b, hkv, d, 256, device=device, config=ccfg)
    plain = TurboKVCache(b, hkv, d, 256, device=device, config=ccfg)
    k_before = k.clone()
    out = turbo_attention(q, k, v, config=pcfg, kv_cache=filled)
    assert torch.equal(k, k_before)
    assert torch.equal(out, turbo_attention(q, k, v, config=pcfg))
    plain.prefill(k, v)
    assert filled.head_bits == plain.head_bits
    assert filled.lengths.tolist() == [n] * b
    _assert_same_state(filled.contents(), plain.contents())
    assert filled.nbytes() == plain.nbytes()


def test_decode_from_the_filled_cache(device):
    """Prompt of 130 tokens through the prefill (two blocks + 2 buffered), then three decode steps."""
    turbo_attention, TurboKVCache = _api()
    n0, steps = 130, 3
    q, k, v = R.outlier_qkv(1, 4, 2, n0 + steps, 64, device=device, seed=7, outlier_scale=(2.0, 4.0))
    cache = TurboKVCache(1, 2, 64, 256, device=device, config=KernelConfig(num_splits=2))
    turbo_attention(q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], config=KernelConfig(block_m=32, block_n=64, num_stages=1),
                    kv_cache=cache)
    for pos in range(n0, n0 + steps):
        qn = q[:, :, pos:pos + 1]
        out = cache.decode(qn, k[:, :, pos:pos + 1], v[:, :, pos:pos + 1])
        ref = R.decode_attention_reference(qn, cache.contents(), score_bits=cache.decode_score_bits(qn.dtype, qn.shape[1]))
        assert R.attention_error(out.float(), ref).sqnr_db >= SQNR_VS_REF_FP16_DB
        exact = R.exact_attention(qn, k[:, :, :pos + 1], v[:, :, :pos + 1], causal=False)
        assert R.attention_error(out.float(), exact).cosine >= COSINE_4BIT_VS_EXACT
    assert cache.lengths.tolist() == [n0 + steps]


def test_pinned_bits_are_used_by_the_prefill(device):
    turbo_attention, TurboKVCache = _api()
    q, k, v = R.outlier_qkv(1, 4, 4, 80, 64, device=device, seed=3)
    cache = TurboKVCache(1, 4, 64, 128, device=device, config=KernelConfig(bit_mix=0.5))
    cache.pin_bits([2, 4, 4, 2])
    turbo_attention(q, k, v, config=KernelConfig(block_m=32, block_n=32, num_stages=1), kv_cache=cache)
    assert cache.head_bits == [2, 4, 4, 2]


def _device_priority(stats, lens, mean, n_low, d, device):
    from kernels.quant import assign_bits_from_moments, head_moments

    h = stats.kpart.shape[0] // len(lens)
    lens_dev = torch.tensor(lens, dtype=torch.int32, device=device)
    mom = head_moments(stats, lens_dev, mean, priority=True)
    prio = torch.empty(h, device=device)
    bits = torch.empty(h, dtype=torch.int32, device=device)
    slots = torch.empty_like(bits)
    assign_bits_from_moments(mom, n_low, sum(lens) * d, prio, bits, slots)
    return prio.cpu(), bits.cpu().tolist(), slots.cpu().tolist()


def test_statistics_priority_and_mean_match_the_reference(device):
    """Batch of 3 with lengths 150, 0, 77 (an empty sequence), heads of different scales."""
    from kernels.quant import channel_statistics

    _, k, v = R.outlier_qkv(3, 4, 4, 150, 96, dtype=torch.float32, seed=11)
    k = (k * torch.tensor([1.0, 3.0, 0.5, 2.0])[None, :, None, None]).half().to(device)
    v = (v * torch.tensor([2.0, 1.0, 0.7, 1.5])[None, :, None, None]).half().to(device)
    lens = [150, 0, 77]
    stats = channel_statistics(None, k, v, 128, sumsq=True, lengths=torch.tensor(lens, dtype=torch.int32, device=device))
    mean = torch.full((3, 4, 96), float("nan"), device=device)
    prio, bits, slots = _device_priority(stats, lens, mean, 2, 96, device)
    assert torch.allclose(mean, R.kv_smoothing_mean(k, torch.tensor(lens)), rtol=1e-5, atol=1e-6)
    want = R.kv_head_priority(k, v, torch.tensor(lens), mean).cpu()
    assert torch.allclose(prio, want, rtol=PRIORITY_RTOL, atol=0), (prio, want)
    assert bits == R.assign_head_bits(want, 0.5).tolist() and slots == R.head_slots(bits)
    # without smoothing, K's moments are about zero: the channel means' spread counts in the variance
    prio, _, _ = _device_priority(stats, lens, None, 2, 96, device)
    want = R.kv_head_priority(k, v, torch.tensor(lens), None).cpu()
    assert torch.allclose(prio, want, rtol=PRIORITY_RTOL, atol=0), (prio, want)


@pytest.mark.parametrize("priority,n_low", [
    ([3.0, 1.0, 2.0, 1.0, 5.0], 2),  # a tie at the bottom: the lower index goes first
    ([1.0, 1.0, 1.0, 1.0], 3),  # all equal: the first n_low heads
    ([0.5, 4.0, 0.25, 2.0] * 5, 7),  # 20 heads, more than one warp's worth of lanes in HP
    ([2.0, 1.0], 0),
    ([2.0, 1.0], 2),
])
def test_device_assignment_is_a_stable_sort(priority, n_low, device):
    """Moments crafted so that K's priority is the given value (std 1) and V's is 0: the device
    assignment equals reference.assign_head_bits and its slots reference.head_slots."""
    from kernels.quant import assign_bits_from_moments

    h, count = len(priority), 1000
    mom = torch.zeros(2, h, 2, 5, dtype=torch.float64)  # two sequences, (K, V) x (max, min, m2, s1, s2)
    mom[0, :, :, 0] = torch.tensor(priority, dtype=torch.float64)[:, None]  # max, in sequence 0 only
    mom[1, :, :, 0] = float("-inf")
    mom[:, :, 1, 0] = float("-inf")  # V holds no value: gap 0, priority 0
    mom[:, :, :, 1] = float("inf")
    mom[:, :, 0, 1] = 0.0  # K's min 0 in both sequences: gap = priority
    mom[1, :, 0, 2] = count  # second moments in sequence 1 only: variance 1
    prio = torch.empty(h, device=device)
    bits = torch.empty(h, dtype=torch.int32, device=device)
    slots = torch.empty_like(bits)
    assign_bits_from_moments(mom.to(device), n_low, count, prio, bits, slots)
    want = torch.tensor(priority) / torch.tensor(priority).mean()
    assert torch.allclose(prio.cpu(), want, rtol=1e-6)
    want_bits = R.assign_head_bits(want, n_low / h).tolist()
    assert bits.cpu().tolist() == want_bits
    assert slots.cpu().tolist() == R.head_slots(want_bits)


def test_statistics_of_an_all_empty_batch(device):
    """No token held: the mean is 0 (not NaN) and the priorities are all 0 (first heads take 2 bits)."""
    from kernels.quant import channel_statistics

    _, k, v = R.outlier_qkv(2, 2, 2, 20, 64, device=device, seed=1)
    stats = channel_statistics(None, k, v, 64, sumsq=True, lengths=torch.zeros(2, dtype=torch.int32, device=device))
    mean = torch.full((2, 2, 64), float("nan"), device=device)
    prio, bits, _ = _device_priority(stats, [0, 0], mean, 1, 64, device)
    assert torch.equal(mean, torch.zeros_like(mean))
    assert torch.equal(prio, torch.zeros(2)) and bits == [2, 4]


def test_head_moments_refuses_partials_without_v():
    from kernels.quant import channel_statistics, head_moments

    _, k, _ = R.outlier_qkv(1, 2, 2, 20, 64, seed=1)
    stats = channel_statistics(None, k, None, 64)
    with pytest.raises(ValueError, match="need V's statistics"):
        head_moments(stats, torch.tensor([20], dtype=torch.int32), None, priority=True)


@pytest.mark.parametrize("make,exc,needle", [
    (lambda T, dev: "cache", TypeError, "kv_cache must be a kernels.TurboKVCache"),
    (lambda T, dev: T(2, 2, 64, 128, device=dev), ValueError, "kv_cache holds"),  # batch 2, prompt batch 1
    (lambda T, dev: T(1, 1, 64, 128, device=dev), ValueError, "kv_cache holds"),  # 1 KV head, prompt 2
    (lambda T, dev: T(1, 2, 128, 128, device=dev), ValueError, "kv_cache holds"),  # D 128, prompt 64
    (lambda T, dev: T(1, 2, 64, 32, device=dev), ValueError, "max_len=32"),  # prompt of 40 tokens
])
def test_bad_kv_cache_raises_before_launch(make, exc, needle, device):
    turbo_attention, TurboKVCache = _api()
    q, k, v = R.outlier_qkv(1, 4, 2, 40, 64, device=device, seed=2)
    cache = make(TurboKVCache, device)
    before = cache.nbytes() if not isinstance(cache, str) else None
    with pytest.raises(exc, match=needle):
        turbo_attention(q, k, v, config=KernelConfig(block_m=32, block_n=32), kv_cache=cache)
    if before is not None:
        assert cache.lengths.tolist() == [0] * cache.batch and cache.nbytes() == before


# ------------------------------------------------------------------ GPU tier

@pytest.mark.gpu
@pytest.mark.parametrize("bit_mix", [0.0, 0.5])
def test_gpu_prefill_fills_the_cache_at_8k(bit_mix):
    """llama3-8b's heads (32 / 8, D = 128), B = 2, N = 8200 (a partial buffer), default configs."""
    turbo_attention, TurboKVCache = _api()
    b, n = 2, 8200
    q, k, v = R.outlier_qkv(b, 32, 8, n, 128, device="cuda", seed=8)
    filled = TurboKVCache(b, 8, 128, n + 64, device="cuda", config=KernelConfig(bit_mix=bit_mix))
    plain = TurboKVCache(b, 8, 128, n + 64, device="cuda", config=KernelConfig(bit_mix=bit_mix))
    out = turbo_attention(q, k, v, config=KernelConfig(), kv_cache=filled)
    assert torch.equal(out, turbo_attention(q, k, v, config=KernelConfig()))
    plain.prefill(k, v)
    _assert_same_state(filled.contents(), plain.contents())
    qn = q[:, :, -1:]
    step = filled.decode(qn, k[:, :, -1:], v[:, :, -1:])
    ref = R.decode_attention_reference(qn, filled.contents(), score_bits=filled.decode_score_bits(qn.dtype, qn.shape[1]))
    assert R.attention_error(step.float(), ref).sqnr_db >= SQNR_VS_REF_FP16_DB
