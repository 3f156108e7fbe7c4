"""The Gluon prefill kernel (kernels/prefill_gluon.py): the schedule it was written for, its limits,
and (GPU tier) its numerics, which are those of kernels/prefill.py and the reference.

CPU tier: the kernel compiled offline for sm_90 (it has no interpreter path). In its unmasked KV
loop the next tile's QK^T wgmma must be issued among the current tile's exponentials, with one wait
per tile, after the PV product: that overlap is what Triton's tl.dot cannot express (it waits after
each product; tests/test_sass.py shows the Triton kernel's two waits per tile).
GPU tier: the kernel against the reference with the same config (SQNR >= 50 dB, as the Triton
kernel; only exp2 rounding and fp32 order differ) and against exact attention (the DESIGN floor).
"""

import pytest
import torch

from kernels import reference as R
from kernels.config import KernelConfig

SQNR_KERNEL_VS_REF_DB = 50.0
COSINE_FLOOR = 0.999


@pytest.mark.parametrize("d,block_n", [(128, 128), (64, 64)])
def test_gluon_loop_overlaps_the_next_scores_with_the_softmax(d, block_n):
    from autotune.sass import gluon_prefill_sass, loop_schedule

    report, sass = gluon_prefill_sass(d, block_n, causal=True)
    assert report.registers <= 255
    unmasked, masked = report.loops[:2]
    for loop in (unmasked, masked):
        order = "".join(t for t in loop_schedule(sass, loop) if t != "S")
        assert order.count("W") == 1 and order.rindex("G") < order.index("W"), order  # one wait, after both products
        # the next tile's scores are issued before most of this tile's exponentials
        assert order[order.index("G"):].count("E") >= order.count("E") / 2, order
    spills = sum(n for op, n in unmasked.ops.items() if op.startswith(("STL", "LDL")))
    assert spills <= 8, unmasked.ops  # 2 at the change that added this test (D = 128, Bc = 128)
    assert unmasked.instructions < 1000  # 864 then, against 853 for the Triton kernel's loop


@pytest.mark.parametrize("changes,needle", [
    (dict(use_sas=True), "exp2 without a threshold"),
    (dict(sparsity_threshold=8.0), "exp2 without a threshold"),
    (dict(block_m=128), "block_m=64"),
    (dict(num_warps=8), "num_warps=4"),
    (dict(block_n=256), "block_n"),
])
def test_gluon_limits_raise_before_any_launch(changes, needle):
    from kernels.prefill_gluon import check_gluon_config

    with pytest.raises(ValueError, match=needle):
        check_gluon_config(KernelConfig(**changes), 128)
    with pytest.raises(ValueError, match="head_dim"):
        check_gluon_config(KernelConfig(), 96)


def test_gluon_entry_point_checks_inputs_before_any_launch():
    from kernels.prefill_gluon import turbo_attention_gluon

    q, k, v = R.outlier_qkv(1, 4, 2, 16, 128)
    with pytest.raises(ValueError, match="multiple"):
        turbo_attention_gluon(q[:, :3], k, v)
    with pytest.raises(ValueError, match="head dim"):
        turbo_attention_gluon(q[..., :96], k[..., :96], v[..., :96])
    with pytest.raises(TypeError, match="causal"):
        turbo_attention_gluon(q, k, v, causal=1)
    with pytest.raises(ValueError, match="exp2 without a threshold"):
        turbo_attention_gluon(q, k, v, config=KernelConfig(use_sas=True))
    with pytest.raises(ValueError, match="CUDA"):
        turbo_attention_gluon(q, k, v)


def _run(q, k, v, causal, cfg):
    from kernels.prefill_gluon import launch_flashq_gluon
    from kernels.quant import quantize_kv_tiles

    d = q.shape[-1]
    kv = quantize_kv_tiles(q, k, v, cfg.block_n, d ** -0.5, cfg.smooth_k, cfg.balance)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    return launch_flashq_gluon(q, kv, out, causal, cfg, d ** -0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 100, 1000, 4097])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d,block_n", [(128, 128), (64, 64), (128, 64)])
def test_gpu_gluon_matches_reference(n, causal, d, block_n):
    q, k, v = R.outlier_qkv(2, 8, 2, n, d, device="cuda", seed=n + d)
    cfg = KernelConfig(block_n=block_n)
    out = _run(q, k, v, causal, cfg)
    assert not torch.isnan(out).any()
    ref = R.turbo_attention_reference(q, k, v, causal, cfg)
    assert R.attention_error(out.float(), ref).sqnr_db >= SQNR_KERNEL_VS_REF_DB
    assert R.attention_error(out.float(), R.exact_attention(q, k, v, causal)).cosine >= COSINE_FLOOR


@pytest.mark.gpu
@pytest.mark.parametrize("p_scale", ["row", "fixed"])
def test_gpu_gluon_seed_shape_against_exact_and_triton(p_scale):
    from kernels.prefill import turbo_attention

    q, k, v = R.outlier_qkv(1, 32, 8, 4096, 128, device="cuda", seed=3)
    cfg = KernelConfig(p_scale=p_scale)
    out = _run(q, k, v, True, cfg)
    assert R.attention_error(out.float(), R.exact_attention(q, k, v, True)).cosine >= COSINE_FLOOR
    triton_out = turbo_attention(q, k, v, causal=True, config=cfg)
    assert R.attention_error(out.float(), triton_out.float()).sqnr_db >= SQNR_KERNEL_VS_REF_DB


@pytest.mark.gpu
def test_gpu_gluon_entry_point_bf16_views():
    from kernels.prefill_gluon import turbo_attention_gluon

    q, k, v = R.outlier_qkv(2, 8, 2, 300, 64, dtype=torch.bfloat16, device="cuda", seed=9)
    qv = q.transpose(1, 2).contiguous().transpose(1, 2)  # a [B, N, H, D] projection seen as [B, H, N, D]
    out = turbo_attention_gluon(qv, k, v, causal=True)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert R.attention_error(out.float(), R.exact_attention(q, k, v, True)).cosine >= COSINE_FLOOR
