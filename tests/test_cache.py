"""TurboKVCache (kernels/cache.py) and the split-KV decode kernels (kernels/decode.py).

Two references per check (STYLE.md): `reference.decode_attention_reference` on the cache's own
contents (the same arithmetic in fp64), and fp32 exact attention over the full-precision history.

Tolerances and why:
- prefill/flush kernel vs `reference.quantize_kv_cache` given the cache's own smoothing mean:
  identical codes, scales and zero points. The kernel computes 127 / amax as torch does
  (reciprocal, then times 127, each correctly rounded: div_rn in the kernel), and the rest is
  exact integer arithmetic. The mean itself comes from the Triton statistics pass (fp32 sums per
  256-row chunk, float64 across chunks) and torch sums in another order: it matches
  `reference.kv_smoothing_mean` to MEAN_RTOL of the channel's mean absolute value (fp32 rounding of
  sums over <= 8k tokens, measured ~1e-7). Stage-1 scales agree to 1 ulp (torch's amax / 127 is a multiplication by 1 / 127
  on CUDA).
- decode kernel vs the reference on the same contents, with the reference told the kernel's score
  quantization (`TurboKVCache.decode_score_bits`: where a KV head's query heads x V groups fit 16
  rows the scores come from q' kscale quantized to INT8 per query head and block, one operand or,
  with config.decode_q_split or fp32 q, two (hi + lo / 254); the reference applies the same
  rounding, so only rounding-boundary ties and fp32 order differ). fp32 q (fp32 output): the
  remaining products run on fp16 tensor cores with every fp32 operand split hi + lo (relative
  residual ~2^-22), and fp32 accumulation order and exp2 differ: SQNR >= 90 dB (measured 110-130 dB).
  With fp16/bf16 q the output is rounded to q's dtype (relative 2^-11 / 2^-8) and P enters its
  product as one fp16 operand (no lo part: relative 2^-12 per probability): SQNR >= 65 / 42 dB.
- decode vs exact attention (quantization error, the cache's accuracy itself), token by token for
  200 steps after a 56-token prompt (3 flushes): on keys with mild outlier channels (2-4x),
  all-4-bit heads reach cosine 0.992 (floor 0.99) and 2-bit heads 0.82 (floor 0.78). On the
  harsh default outliers (10-20x keys, very peaked attention) 4-bit reaches 0.982-0.988: that
  is the limit of 4-bit per-channel K over 64-token groups itself (KIVI-style fp 4-bit fake
  quantization of the same inputs lands at the same place), and the floor there is 0.97. The
  GPU test of 200 steps at 4k-12k on those outliers measured 0.9728 with the two-operand INT8
  scores (decode_q_split) and 0.9686 with the default one-operand scores (floor 0.965): the INT8
  query costs ~0.004 of cosine there.
"""

import json

import pytest
import torch

from kernels import reference as R
from kernels.config import KernelConfig

SQNR_VS_REF_FP32_DB = 90.0
SQNR_VS_REF_FP16_DB = 65.0
SQNR_VS_REF_BF16_DB = 42.0
COSINE_4BIT_MILD = 0.99
COSINE_2BIT_MILD = 0.78
COSINE_4BIT_HARSH = 0.97
COSINE_4BIT_HARSH_INT8 = 0.965  # one-operand INT8 scores (default): measured 0.9686 on the H100, split 0.9728
MILD_OUTLIERS = (2.0, 4.0)
MEAN_RTOL = 1e-5


def _cache_cls():
    from kernels.cache import TurboKVCache

    return TurboKVCache


def _cfg(**kw):
    base = dict(buffer_tokens=64, v_group=32, decode_block_n=64, num_splits=2)
    base.update(kw)
    return KernelConfig(**base)


def _make(b, hkv, d, max_len, device, cfg=None, dtype=torch.float16):
    return _cache_cls()(b, hkv, d, max_len, device=device, dtype=dtype, config=cfg or _cfg())


def _exact_per_sequence(q, k, v, lengths):
    """Exact attention of q [B, Hq, 1, D] over each sequence's first lengths[b] tokens."""
    return torch.cat([R.exact_attention(q[i:i + 1].float(), k[i:i + 1, :, :n].float(), v[i:i + 1, :, :n].float(), False)
                      for i, n in enumerate(lengths)], dim=0)


def _decode_ref(q, cache):
    """reference.decode_attention_reference on the cache's contents, with the score quantization of
    the kernel that runs (INT8 q' kscale, one or two operands, on the folded path; exact otherwise)."""
    return R.decode_attention_reference(q, cache.contents(), score_bits=cache.decode_score_bits(q.dtype, q.shape[1]))


def _reference_contents(k, v, lens, bits, cache, v_group=32, max_len=None):
    """reference.quantize_kv_cache with the cache's smoothing mean, after checking that mean against
    reference.kv_smoothing_mean (module docstring: MEAN_RTOL)."""
    mean = cache.contents().k_mean
    want = R.kv_smoothing_mean(k, lens.cpu())
    scale = k.float().abs().mean(dim=2).to(want.device) + 1e-30
    assert ((mean - want).abs() / scale).max() <= MEAN_RTOL
    return R.quantize_kv_cache(k, v, lens, torch.tensor(bits), cache.block_tokens, v_group, True, max_len=max_len,
                               k_mean=mean)


def _assert_contents_equal(got, ref):
    """Every stored value in use is identical (blocks below each length, the buffer's valid rows),
    except the stage-1 scales, equal to 1 ulp: torch computes amax / 127 as a division on the CPU
    but as amax * (1 / 127) on CUDA, while the kernel always divides (the codes use the same
    reciprocal * 127 everywhere, so they are identical)."""
    for name in ("k_mean", "lengths", "head_bits", "head_slot"):
        a, b = getattr(got, name), getattr(ref, name)
        assert torch.equal(a.cpu().to(b.dtype), b.cpu()), name
    for name in ("k_s1", "v_s1"):
        a, b = getattr(got, name).cpu(), getattr(ref, name).cpu()
        assert torch.allclose(a, b, rtol=1.2e-7, atol=0), name
    lens = [int(x) for x in ref.lengths.tolist()]
    nb = ref.block_tokens
    for name in ("k_buffer", "v_buffer"):  # rows past a sequence's length % n_b are stale, unused
        for i, n in enumerate(lens):
            a, b = getattr(got, name)[i, :, :n % nb], getattr(ref, name)[i, :, :n % nb]
            assert torch.equal(a.cpu(), b.cpu()), (name, i)
    for pool in ("pool4", "pool2"):
        for field, a, b in zip(R.PackedKV._fields, getattr(got, pool), getattr(ref, pool)):
            assert a.shape == b.shape, (pool, field)
            for i, n in enumerate(lens):  # blocks past a sequence's length are unused storage
                assert torch.equal(a[i, :, :n // nb].cpu(), b[i, :, :n // nb].cpu()), (pool, field, i)


# ------------------------------------------------------------------ heuristics

def test_decode_tile_and_split_heuristics():
    from kernels.decode import MIN_TILES_PER_SPLIT, decode_num_splits, decode_tile_tokens

    assert decode_tile_tokens(64, 64) == 64
    assert decode_tile_tokens(128, 64) == 64  # a tile never straddles two quantization blocks
    assert decode_tile_tokens(64, 48) == 16
    assert decode_tile_tokens(32, 96) == 32
    assert decode_num_splits(0, 8, 132) == 0  # nothing packed: only the buffer program
    assert decode_num_splits(10, 8, 132, num_splits=4) == 4
    assert decode_num_splits(3, 8, 132, num_splits=16) == 3  # never more splits than tiles
    # llama3-8b at 32k, B = 1: 8 programs per split, 512 tiles -> two waves on 132 SMs
    assert decode_num_splits(512, 8, 132) == 33
    # batch 16 already fills the GPU; a short context keeps MIN_TILES_PER_SPLIT tiles per split
    assert decode_num_splits(512, 128, 132) == 512 // 16  # many heads: about 16 tiles per split
    assert decode_num_splits(8, 8, 132) == 8 // MIN_TILES_PER_SPLIT


def test_lowbit_quotient_from_fp32_is_the_exact_floor():
    """decode._lowbit takes floor(num / scale) as trunc(num * (1 / scale) + 2^-9) in fp32. Over the
    whole domain (0 <= num <= 381, 1 <= scale <= 254; the kernel needs num <= 296, scale <= 85) it
    equals the integer quotient, with the reciprocal up to 2 ulp off (the GPU's approximate
    division), the product rounded before the add or fused with it (FFMA)."""
    num = torch.arange(0, 382, dtype=torch.int32)[:, None]
    scale = torch.arange(1, 255, dtype=torch.int32)[None, :]
    inv = 1.0 / scale.float()
    ulp = torch.nextafter(inv, torch.full_like(inv, 2.0)) - inv
    for off in (-2, -1, 0, 1, 2):
        r = inv + off * ulp
        separate = (num.float() * r + 2.0 ** -9).to(torch.int32)
        fused = (num.double() * r.double() + 2.0 ** -9).float().to(torch.int32)
        assert torch.equal(separate, num // scale), off
        assert torch.equal(fused, num // scale), off


# ------------------------------------------------------------------ prefill contents

@pytest.mark.parametrize("b,hkv,d,n,lengths,bits,v_group", [
    (1, 2, 64, 150, None, [4, 2], 32),
    (2, 2, 96, 130, [130, 70], [2, 4], 32),  # D = 96: partial last V group with v_group 64 below
    (1, 2, 80, 64, None, [4, 4], 64),
    (2, 1, 128, 200, [0, 200], [2], 128),
])
def test_prefill_stores_reference_contents(b, hkv, d, n, lengths, bits, v_group, device):
    q, k, v = R.outlier_qkv(b, hkv, hkv, n, d, device=device, seed=n + d)
    cfg = _cfg(v_group=v_group)
    cache = _make(b, hkv, d, 256, device, cfg)
    lens = torch.tensor(lengths if lengths else [n] * b)
    k_before = k.clone()
    cache.prefill(k, v, lengths=lens if lengths else None, bits=bits)
    assert torch.equal(k, k_before), "prefill must not modify the caller's K"
    assert cache.head_bits == bits
    ref = _reference_contents(k, v, lens, bits, cache, v_group, max_len=256)
    _assert_contents_equal(cache.contents(), ref)


def test_prefill_accepts_views_and_bf16(device):
    """A model's [B, N, H, D] projection transposed (non-contiguous), bf16 cache."""
    _, k, v = R.outlier_qkv(1, 2, 2, 100, 64, dtype=torch.bfloat16, device=device, seed=4)
    kv = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not kv.is_contiguous()
    cache = _make(1, 2, 64, 128, device, dtype=torch.bfloat16)
    cache.prefill(kv, v, bits=[4, 2])
    ref = _reference_contents(k, v, torch.tensor([100]), [4, 2], cache, max_len=128)
    _assert_contents_equal(cache.contents(), ref)


# ------------------------------------------------------------------ decode vs reference

DECODE_CASES = [
    # (b, hq, hkv, d, n, bits, num_splits, q dtype)
    (1, 2, 2, 64, 150, [4, 2], 2, torch.float32),
    (1, 8, 2, 128, 200, [4, 4], 3, torch.float32),   # GQA ratio 4
    (1, 4, 4, 96, 130, [2, 4, 4, 2], None, torch.float32),  # D = 96, heuristic split count
    (1, 7, 1, 80, 70, [2], 1, torch.float16),          # GQA ratio 7, D = 80, fp16 output
    (2, 4, 2, 64, 100, [2, 2], 2, torch.float16),
]


@pytest.mark.parametrize("b,hq,hkv,d,n,bits,splits,qdtype", DECODE_CASES)
def test_decode_matches_reference_on_cache_contents(b, hq, hkv, d, n, bits, splits, qdtype, device):
    q, k, v = R.outlier_qkv(b, hq, hkv, n + 1, d, device=device, seed=7 * n + d)
    cache = _make(b, hkv, d, 256, device, _cfg(num_splits=splits))
    cache.prefill(k[:, :, :n], v[:, :, :n], bits=bits)
    qn = q[:, :, n:].to(qdtype)
    out = cache.decode(qn, k[:, :, n:].to(qdtype), v[:, :, n:].to(qdtype))
    assert out.shape == (b, hq, 1, d) and out.dtype == qdtype
    assert cache.lengths.tolist() == [n + 1] * b
    ref = _decode_ref(qn, cache)
    floor = SQNR_VS_REF_FP32_DB if qdtype == torch.float32 else SQNR_VS_REF_FP16_DB
    err = R.attention_error(out.float(), ref)
    assert err.sqnr_db >= floor, err


@pytest.mark.parametrize("split", [False, True])
def test_decode_int8_scores_one_or_two_operands(split, device):
    """llama3-8b's ratio (4 query heads x 4 V groups = 16 rows: the INT8-score kernel). Both modes
    match the reference with their own score quantization; two operands (~15 bits) are as close to
    exact-q' scores as the fp16 products were (> 60 dB), one (~7 bits) is not (measured ~25-40 dB)."""
    q, k, v = R.outlier_qkv(1, 8, 2, 201, 128, device=device, seed=5)
    cache = _make(1, 2, 128, 256, device, _cfg(decode_q_split=split))
    cache.prefill(k[:, :, :200], v[:, :, :200], bits=[4, 2])
    assert cache.folded_decode(8) and cache.decode_score_bits(torch.float16, 8) == (16 if split else 8)
    out = cache.decode(q[:, :, 200:], k[:, :, 200:], v[:, :, 200:])
    assert R.attention_error(out.float(), _decode_ref(q[:, :, 200:], cache)).sqnr_db >= SQNR_VS_REF_FP16_DB
    exact_q = R.decode_attention_reference(q[:, :, 200:], cache.contents())
    vs_exact_q = R.attention_error(out.float(), exact_q).sqnr_db
    assert (vs_exact_q >= 60.0) if split else (vs_exact_q < 50.0), vs_exact_q


def test_decode_bf16_cache_matches_reference(device):
    q, k, v = R.outlier_qkv(1, 4, 2, 101, 64, dtype=torch.bfloat16, device=device, seed=11)
    cache = _make(1, 2, 64, 128, device, dtype=torch.bfloat16)
    cache.prefill(k[:, :, :100], v[:, :, :100], bits=[4, 2])
    out = cache.decode(q[:, :, 100:], k[:, :, 100:], v[:, :, 100:])
    assert out.dtype == torch.bfloat16
    err = R.attention_error(out.float(), _decode_ref(q[:, :, 100:], cache))
    assert err.sqnr_db >= SQNR_VS_REF_BF16_DB, err


def test_gqa_ratio_4_against_exact(device):
    """Each KV block is loaded once for its 4 query heads; every query head still gets its own
    softmax: compare each against exact attention (4-bit, mild outliers, prompt in the buffer and
    in two packed blocks)."""
    q, k, v = R.outlier_qkv(1, 8, 2, 161, 64, device=device, seed=3, outlier_scale=MILD_OUTLIERS)
    cache = _make(1, 2, 64, 256, device)
    cache.prefill(k[:, :, :160], v[:, :, :160], bits=[4, 4])
    out = cache.decode(q[:, :, 160:], k[:, :, 160:], v[:, :, 160:])
    exact = R.exact_attention(q[:, :, 160:], k, v, causal=False)
    # one step of 8 heads is a noisier statistic than the 200-step floor (measured 0.988 here)
    for h in range(8):
        assert R.attention_error(out[:, h].float(), exact[:, h]).cosine >= 0.95, h
    assert R.attention_error(out.float(), exact).cosine >= 0.98
    ref = _decode_ref(q[:, :, 160:], cache)
    assert R.attention_error(out.float(), ref).sqnr_db >= SQNR_VS_REF_FP16_DB


def test_batch_of_three_with_different_lengths(device):
    lens = [40, 100, 150]
    q, k, v = R.outlier_qkv(3, 4, 2, 160, 64, device=device, seed=9, outlier_scale=MILD_OUTLIERS)
    cache = _make(3, 2, 64, 256, device)
    cache.prefill(k, v, lengths=torch.tensor(lens), bits=[4, 4])
    # the new token of sequence b sits at position lens[b] of the history
    idx = torch.tensor(lens, device=device)
    pick = lambda x: x[torch.arange(3, device=device), :, idx][:, :, None]  # noqa: E731
    qn, kn, vn = pick(q), pick(k), pick(v)
    out = cache.decode(qn, kn, vn)
    assert cache.lengths.tolist() == [n + 1 for n in lens]
    ref = _decode_ref(qn, cache)
    assert R.attention_error(out.float(), ref).sqnr_db >= SQNR_VS_REF_FP16_DB
    for i, n in enumerate(lens):
        kk = torch.cat([k[i:i + 1, :, :n], kn[i:i + 1]], dim=2)
        vv = torch.cat([v[i:i + 1, :, :n], vn[i:i + 1]], dim=2)
        exact = R.exact_attention(qn[i:i + 1], kk, vv, causal=False)
        assert R.attention_error(out[i:i + 1].float(), exact).cosine >= 0.98, i


@pytest.mark.parametrize("start", [63, 64, 65, 129])
def test_flush_boundaries(start, device):
    """Prompt of `start` tokens, then two decode steps with n_b = 64: 63 -> 64 flushes the buffer
    at the first step, 64 starts a fresh buffer, 65 and 129 append to a partial one. After each
    step the stored blocks equal the reference quantization of the whole history (the prompt's
    smoothing mean kept), and the output matches the reference on those contents."""
    n_steps = 2
    q, k, v = R.outlier_qkv(1, 4, 2, start + n_steps, 64, device=device, seed=start)
    cache = _make(1, 2, 64, 256, device)
    cache.prefill(k[:, :, :start], v[:, :, :start], bits=[4, 2])
    mean = cache.contents().k_mean.clone()
    for step in range(n_steps):
        pos = start + step
        out = cache.decode(q[:, :, pos:pos + 1], k[:, :, pos:pos + 1], v[:, :, pos:pos + 1])
        n = pos + 1
        got = cache.contents()
        assert int(got.lengths[0]) == n
        ref = R.quantize_kv_cache(k[:, :, :n], v[:, :, :n], torch.tensor([n]), torch.tensor([4, 2]), 64, 32, True,
                                  max_len=256, k_mean=mean)
        _assert_contents_equal(got, ref)
        err = R.attention_error(out.float(), _decode_ref(q[:, :, pos:pos + 1], cache))
        assert err.sqnr_db >= SQNR_VS_REF_FP16_DB, (n, err)


@pytest.mark.slow
def test_decode_200_steps_against_exact_history(device):
    """Token by token for 200 steps (0.15 s a step in the interpreter: the one CPU test over 2 s).
    KV head 0 is pinned to 4 bits and head 1 to 2 bits; each is judged on its own query heads."""
    n0, steps = 56, 200
    q, k, v = R.outlier_qkv(1, 4, 2, n0 + steps, 64, device=device, seed=0, outlier_scale=MILD_OUTLIERS)
    cache = _make(1, 2, 64, 256, device, _cfg(num_splits=1))
    cache.prefill(k[:, :, :n0], v[:, :, :n0], bits=[4, 2])
    outs, exact = [], []
    for pos in range(n0, n0 + steps):
        outs.append(cache.decode(q[:, :, pos:pos + 1], k[:, :, pos:pos + 1], v[:, :, pos:pos + 1]).float())
        exact.append(R.exact_attention(q[:, :, pos:pos + 1], k[:, :, :pos + 1], v[:, :, :pos + 1], causal=False))
    out, ref = torch.cat(outs, dim=2), torch.cat(exact, dim=2)
    four = R.attention_error(out[:, :2], ref[:, :2])
    two = R.attention_error(out[:, 2:], ref[:, 2:])
    assert four.cosine >= COSINE_4BIT_MILD, four
    assert two.cosine >= COSINE_2BIT_MILD, two
    assert cache.lengths.tolist() == [n0 + steps]


def test_decode_before_prefill_is_an_empty_context(device):
    """No prefill: the first decode attends to its own token only, so o = v_new."""
    q, k, v = R.outlier_qkv(2, 4, 2, 1, 64, device=device, seed=1)
    cache = _make(2, 2, 64, 128, device)
    out = cache.decode(q, k, v)
    assert torch.allclose(out.float(), v.float().repeat_interleave(2, dim=1), atol=1e-3, rtol=0)
    assert cache.lengths.tolist() == [1, 1]


# ------------------------------------------------------------------ bits, calibration, memory

def test_head_bits_follow_priority_and_bit_mix(device):
    """Heads scaled 1x, 4x, 0.5x, 2x: priority (gap x std) ranks them 2 > 3 > 0 > 1 from the lowest;
    bit_mix 0.5 sends the two lowest (heads 2 and 0) to 2 bits."""
    _, k, v = R.outlier_qkv(1, 4, 4, 64, 64, dtype=torch.float32, seed=2, outlier_channels=0)
    scale = torch.tensor([1.0, 4.0, 0.5, 2.0])[None, :, None, None]
    k, v = (k * scale).half().to(device), (v * scale).half().to(device)
    expected = {0.0: [4, 4, 4, 4], 0.25: [4, 4, 2, 4], 0.5: [2, 4, 2, 4], 1.0: [2, 2, 2, 2]}
    for bit_mix, bits in expected.items():
        cache = _make(1, 4, 64, 128, device, _cfg(bit_mix=bit_mix))
        cache.prefill(k, v)
        assert cache.head_bits == bits, bit_mix
        lens = torch.tensor([64])
        prio = R.kv_head_priority(k, v, lens, R.kv_smoothing_mean(k, lens))
        assert cache.head_bits == R.assign_head_bits(prio.cpu(), bit_mix).tolist()


def test_calibration_file_pins_bits(tmp_path, device):
    _, k, v = R.outlier_qkv(1, 4, 4, 64, 64, device=device, seed=5)
    cache = _make(1, 4, 64, 128, device, _cfg(bit_mix=0.5))
    cache.prefill(k, v)
    chosen = cache.head_bits
    assert sorted(chosen) == [2, 2, 4, 4]
    pinned = [2, 4, 4, 4] if chosen != [2, 4, 4, 4] else [4, 2, 4, 4]
    path = tmp_path / "bits.json"
    path.write_text(json.dumps({"schema_version": 1, "num_kv_heads": 4, "bits": pinned}))
    before = cache.nbytes()
    assert cache.load_bits(path) == pinned
    cache.prefill(k, v)
    assert cache.head_bits == pinned
    assert cache.nbytes() > before  # one 2-bit head instead of two: the pools were reallocated
    cache.save_bits(tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["bits"] == pinned
    # bits= on prefill wins over the pinned file for that prompt
    cache.prefill(k, v, bits=[4, 4, 4, 2])
    assert cache.head_bits == [4, 4, 4, 2]
    cache.pin_bits(None)
    cache.prefill(k, v)
    assert cache.head_bits == chosen
    for bad, needle in (({"bits": [4, 4]}, "one entry per KV head"), ({"bits": [4, 3, 4, 4]}, "4 or 2"),
                        ({"bits": [4, 4, 4, 4], "schema_version": 9}, "schema_version"), ([4, 4, 4, 4], "JSON object")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=needle):
            cache.load_bits(path)


@pytest.mark.parametrize("b,hkv,d,max_len,bit_mix,smooth,dtype", [
    (1, 2, 64, 256, 0.0, True, torch.float16),
    (2, 4, 96, 1000, 0.5, True, torch.bfloat16),
    (3, 8, 128, 4096, 1.0, False, torch.float16),
    (1, 3, 80, 130, 0.34, True, torch.float16),
])
def test_nbytes_matches_formula(b, hkv, d, max_len, bit_mix, smooth, dtype, device):
    from kernels.cache import expected_nbytes

    cfg = _cfg(bit_mix=bit_mix, smooth_k=smooth)
    cache = _make(b, hkv, d, max_len, device, cfg, dtype=dtype)
    n2 = R.num_low_bit_heads(hkv, bit_mix)
    assert cache.head_bits.count(2) == n2
    assert cache.nbytes() == expected_nbytes(b, hkv, d, max_len, cfg, n2, dtype)
    # every tensor the cache holds is counted
    held = sum(t.numel() * t.element_size() for t in vars(cache).values() if isinstance(t, torch.Tensor))
    held += sum(t.numel() * t.element_size() for pool in (cache.pool4, cache.pool2) for t in pool)
    assert cache.nbytes() == held


def test_compression_counts_all_metadata(device):
    """llama3-8b's KV geometry at 32k (construction only, no kernels): 4-bit everywhere is 3.6x
    smaller than fp16 with every scale, zero point and buffer counted; the 2/4 mix passes 4.4x."""
    from kernels.cache import expected_nbytes

    fp16 = 2 * 1 * 8 * 32768 * 128 * 2
    cfg4, cfg_mix = _cfg(), _cfg(bit_mix=0.5)
    assert 3.5 <= fp16 / expected_nbytes(1, 8, 128, 32768, cfg4, 0) <= 3.7
    assert fp16 / expected_nbytes(1, 8, 128, 32768, cfg_mix, 4) >= 4.4


# ------------------------------------------------------------------ bad input

def test_constructor_rejects_bad_arguments(device):
    cls = _cache_cls()
    with pytest.raises(ValueError, match="head_dim"):
        cls(1, 2, 48, 128, device=device)
    with pytest.raises(TypeError, match="batch"):
        cls(1.5, 2, 64, 128, device=device)
    with pytest.raises(ValueError, match="max_len"):
        cls(1, 2, 64, 0, device=device)
    with pytest.raises(TypeError, match="dtype"):
        cls(1, 2, 64, 128, device=device, dtype=torch.float32)
    with pytest.raises(TypeError, match="config"):
        cls(1, 2, 64, 128, device=device, config="fast")
    with pytest.raises(ValueError, match="device"):
        cls(1, 2, 64, 128, device="meta")


@pytest.mark.parametrize("make,exc,needle", [
    (lambda k, v: (k[0], v[0]), ValueError, "k must have 4 dimensions"),
    (lambda k, v: (k.to(torch.int8), v), TypeError, "k must have dtype"),
    (lambda k, v: (k, v.float()), TypeError, "share one dtype"),
    (lambda k, v: (k[:, :1], v[:, :1]), ValueError, "Hkv=2"),
    (lambda k, v: (k, v[:, :, :8]), ValueError, "shape of k"),
    (lambda k, v: (torch.cat([k, k], -1)[..., ::2], v), ValueError, "contiguous in its last dim"),
    (lambda k, v: (k.repeat(1, 1, 3, 1), v.repeat(1, 1, 3, 1)), ValueError, "max_len"),
])
def test_prefill_bad_input_raises(make, exc, needle, device):
    _, k, v = R.outlier_qkv(1, 2, 2, 40, 64, device=device)
    cache = _make(1, 2, 64, 100, device)
    k2, v2 = make(k, v)
    with pytest.raises(exc, match=needle):
        cache.prefill(k2, v2)


def test_prefill_bad_lengths_and_bits(device):
    _, k, v = R.outlier_qkv(2, 2, 2, 40, 64, device=device)
    cache = _make(2, 2, 64, 100, device)
    with pytest.raises(ValueError, match="lengths must be in"):
        cache.prefill(k, v, lengths=torch.tensor([41, 3]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        cache.prefill(k, v, lengths=torch.tensor([4]))
    with pytest.raises(TypeError, match="integer dtype"):
        cache.prefill(k, v, lengths=torch.tensor([4.0, 3.0]))
    with pytest.raises(ValueError, match="4 or 2"):
        cache.prefill(k, v, bits=[4, 8])
    with pytest.raises(ValueError, match="one entry per KV head"):
        cache.prefill(k, v, bits=[4])


def test_decode_bad_input_raises(device):
    q, k, v = R.outlier_qkv(1, 4, 2, 1, 64, device=device)
    cache = _make(1, 2, 64, 2, device)
    with pytest.raises(ValueError, match="multiple of the cache's KV heads"):
        cache.decode(q[:, :3], k, v)
    with pytest.raises(ValueError, match=r"q must be \[B=1"):
        cache.decode(q.expand(1, 4, 2, 64), k, v)
    with pytest.raises(ValueError, match="k_new and v_new must have 1 token"):
        cache.decode(q, k.expand(1, 2, 2, 64), v.expand(1, 2, 2, 64))
    with pytest.raises(TypeError, match="share one dtype"):
        cache.decode(q.float(), k, v)
    with pytest.raises(TypeError, match="q must have dtype"):
        cache.decode(q.to(torch.int8), k, v)
    with pytest.raises(ValueError, match="sm_scale"):
        cache.decode(q, k, v, sm_scale=-1.0)
    cache.decode(q, k, v)
    cache.decode(q, k, v)
    with pytest.raises(ValueError, match="past max_len=2"):
        cache.decode(q, k, v)
    assert cache.lengths.tolist() == [2]


# ------------------------------------------------------------------ GPU tier

SEED_MODELS = {"phi3-mini": (32, 32, 96), "llama3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128)}


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(SEED_MODELS))
@pytest.mark.parametrize("bit_mix", [0.0, 0.5])
def test_gpu_32k_decode_matches_reference_and_exact(model, bit_mix):
    hq, hkv, d = SEED_MODELS[model]
    n = 32768
    q, k, v = R.outlier_qkv(1, hq, hkv, n + 2, d, device="cuda", seed=n, outlier_scale=MILD_OUTLIERS)
    cache = _cache_cls()(1, hkv, d, n + 64, device="cuda", config=KernelConfig(bit_mix=bit_mix))
    cache.prefill(k[:, :, :n], v[:, :, :n])
    for pos in (n, n + 1):
        qn = q[:, :, pos:pos + 1].float()
        out = cache.decode(qn, k[:, :, pos:pos + 1].float(), v[:, :, pos:pos + 1].float())
        err = R.attention_error(out, _decode_ref(qn, cache))
        assert err.sqnr_db >= SQNR_VS_REF_FP32_DB, err
    # one step (not 200): 4-bit measured 0.990 on phi3-mini, floor 0.985; the 2/4 mix is bounded
    # by its 2-bit heads (0.82 over 200 steps on these inputs), floor 0.8
    exact = R.exact_attention(q[:, :, n + 1:], k, v, causal=False)
    floor = 0.985 if bit_mix == 0.0 else 0.8
    assert R.attention_error(out, exact).cosine >= floor


@pytest.mark.gpu
def test_gpu_prefill_contents_match_reference_at_8k():
    b, hkv, d, n = 2, 4, 128, 8192
    _, k, v = R.outlier_qkv(b, hkv, hkv, n, d, device="cuda", seed=1)
    lens = torch.tensor([n, 5000])
    cache = _cache_cls()(b, hkv, d, n, device="cuda", config=KernelConfig(bit_mix=0.5))
    cache.prefill(k, v, lengths=lens)
    ref = _reference_contents(k, v, lens, cache.head_bits, cache, max_len=n)
    _assert_contents_equal(cache.contents(), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("split,floor", [(False, COSINE_4BIT_HARSH_INT8), (True, COSINE_4BIT_HARSH)])
def test_gpu_batch_and_200_steps_harsh_outliers(split, floor):
    """Batch of 3 at 4k..12k, 200 steps token by token on the harsh default outliers (4-bit), with
    one-operand INT8 scores (the default) and with the hi + lo split (decode_q_split)."""
    lens = [4000, 9000, 12000]
    hq, hkv, d, steps = 32, 8, 128, 200
    n = max(lens) + steps
    q, k, v = R.outlier_qkv(3, hq, hkv, n, d, device="cuda", seed=5)
    cache = _cache_cls()(3, hkv, d, n, device="cuda", config=KernelConfig(decode_q_split=split))
    cache.prefill(k, v, lengths=torch.tensor(lens))
    idx = torch.tensor(lens, device="cuda")
    ar = torch.arange(3, device="cuda")
    outs, refs = [], []
    for step in range(steps):
        pos = idx + step
        pick = lambda x: x[ar, :, pos][:, :, None]  # noqa: E731
        out = cache.decode(pick(q), pick(k), pick(v))
        if step % 50 == 0:
            ref = _decode_ref(pick(q), cache)
            assert R.attention_error(out.float(), ref).sqnr_db >= SQNR_VS_REF_FP16_DB
        outs.append(out.float())
        refs.append(torch.cat([R.exact_attention(pick(q)[i:i + 1], k[i:i + 1, :, :int(pos[i]) + 1],
                                                 v[i:i + 1, :, :int(pos[i]) + 1], False) for i in range(3)]))
    err = R.attention_error(torch.cat(outs, 2), torch.cat(refs, 2))
    assert err.cosine >= floor, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_bench_decode_refuses_to_run_without_a_gpu(capsys):
    from autotune.bench_decode import main

    assert main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
