import pytest

from kernels.config import DEFAULT_CONFIG, KernelConfig, field_names


def test_defaults_are_valid_and_documented():
    cfg = KernelConfig()
    assert cfg == DEFAULT_CONFIG
    assert cfg.block_m == 64 and cfg.block_n == 128 and cfg.buffer_tokens == 64
    doc = KernelConfig.__doc__
    for name in field_names():
        assert name in doc, f"field {name} is not documented in KernelConfig's docstring"


def test_frozen():
    with pytest.raises(Exception):
        KernelConfig().block_m = 64  # type: ignore[misc]


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("block_m", 48, "block_m"),
        ("block_n", 512, "block_n"),
        ("num_warps", 3, "num_warps"),
        ("num_stages", 0, "num_stages"),
        ("num_stages", 2.0, "num_stages"),
        ("compute_format", "int4", "compute_format"),
        ("p_scale", "col", "p_scale"),
        ("smooth_k", 1, "smooth_k"),
        ("use_sas", "yes", "use_sas"),
        ("sparsity_threshold", 0.5, "sparsity_threshold"),
        ("sparsity_threshold", float("nan"), "sparsity_threshold"),
        ("bit_mix", 1.5, "bit_mix"),
        ("bit_mix", -0.1, "bit_mix"),
        ("buffer_tokens", 8, "buffer_tokens"),
        ("buffer_tokens", 72, "buffer_tokens"),
        ("v_group", 24, "v_group"),
        ("decode_block_n", 100, "decode_block_n"),
        ("num_splits", 0, "num_splits"),
        ("max_registers", 16, "max_registers"),
        ("max_registers", 256, "max_registers"),
        ("max_registers", 168.0, "max_registers"),
    ],
)
def test_invalid_values_name_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        KernelConfig(**{field: value})


def test_replace_and_dict_round_trip():
    cfg = KernelConfig().replace(block_m=64, bit_mix=0.5, sparsity_threshold=None)
    assert cfg.block_m == 64 and cfg.bit_mix == 0.5 and cfg.sparsity_threshold is None
    assert KernelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="no field"):
        cfg.replace(blockm=64)
    with pytest.raises(ValueError, match="unknown KernelConfig field"):
        KernelConfig.from_dict({"block_mm": 64})
    with pytest.raises(TypeError):
        KernelConfig.from_dict([("block_m", 64)])


def test_threshold_int_is_normalised_to_float():
    assert KernelConfig(sparsity_threshold=12).sparsity_threshold == 12.0
