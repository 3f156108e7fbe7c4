"""The search space as data: which KernelConfig fields the tuner moves, their choices, and when they apply.

A parameter applies when its condition holds for the workload (decode-only knobs are not sampled
for a prefill-only workload) and for the values already sampled (sparsity threshold choices differ
with SAS on or off). Everything not sampled keeps KernelConfig's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from kernels.config import KernelConfig


@dataclass(frozen=True)
class Param:
    name: str  # a KernelConfig field
    choices: tuple
    applies: Callable[[Mapping[str, Any], "WorkloadKinds"], bool] = lambda sampled, kinds: True
    doc: str = ""


@dataclass(frozen=True)
class WorkloadKinds:
    prefill: bool
    decode: bool


def _prefill(sampled, kinds):
    return kinds.prefill


def _decode(sampled, kinds):
    return kinds.decode


SEARCH_SPACE: tuple[Param, ...] = (
    Param("block_m", (32, 64, 128), _prefill, "Br: query rows per program"),
    Param("block_n", (32, 64, 128, 256), _prefill, "Bc: key rows per inner tile and per K/V INT8 tile"),
    Param("num_warps", (2, 4, 8), _prefill, "warps per prefill program"),
    Param("num_stages", (1, 2, 3, 4), _prefill, "software-pipelining depth of the prefill loop"),
    Param("use_sas", (False, True), _prefill, "SAS polynomial exponential instead of exp2"),
    Param("sparsity_threshold", (None, 8.0, 12.0, 16.0, 24.0), _prefill, "drop scores T octaves under the row max"),
    Param("p_scale", ("row", "fixed"), _prefill, "P's INT8 scale per tile row or fixed 1/127"),
    Param("balance", ("qk", "k", "none"), _prefill, "per-channel Q/K range balance after smoothing"),
    Param("bit_mix", (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0), _decode,
          "fraction of KV heads at 2 bits (lowest priority first)"),
    Param("buffer_tokens", (32, 64, 128, 256), _decode, "fp16 residual buffer and K quantization block"),
    Param("decode_block_n", (32, 64, 128), _decode, "tokens per decode inner tile"),
    Param("decode_num_warps", (2, 4, 8), _decode, "warps per decode program"),
    Param("num_splits", (None, 2, 4, 8, 16, 32, 64), _decode, "split-KV partitions (None: heuristic)"),
)

# Fields that change the numerics (the accuracy objective depends on these alone, so it is cached on them).
NUMERIC_FIELDS = ("block_m", "block_n", "use_sas", "sparsity_threshold", "p_scale", "smooth_k", "balance",
                  "bit_mix", "buffer_tokens", "v_group")


def space_for(kinds: WorkloadKinds, space: tuple[Param, ...] = SEARCH_SPACE) -> tuple[Param, ...]:
    return tuple(p for p in space if p.applies({}, kinds))


def suggest_config(trial, kinds: WorkloadKinds, base: KernelConfig | None = None,
                   space: tuple[Param, ...] = SEARCH_SPACE) -> KernelConfig:
    """Sample a KernelConfig from `trial` (an optuna Trial or FixedTrial); unsampled fields keep `base`."""
    base = base or KernelConfig()
    sampled: dict[str, Any] = {}
    for param in space:
        if param.applies(sampled, kinds):
            sampled[param.name] = trial.suggest_categorical(param.name, list(param.choices))
    return base.replace(**sampled)


def config_params(config: KernelConfig, kinds: WorkloadKinds, space: tuple[Param, ...] = SEARCH_SPACE) -> dict:
    """The trial parameters that reproduce `config` (for enqueue_trial), restricted to the space's choices."""
    values = config.to_dict()
    out = {}
    for param in space:
        if param.applies(out, kinds) and values[param.name] in param.choices:
            out[param.name] = values[param.name]
    return out


def numeric_key(config: KernelConfig) -> tuple:
    values = config.to_dict()
    return tuple(values[f] for f in NUMERIC_FIELDS)


def grid_size(kinds: WorkloadKinds, space: tuple[Param, ...] = SEARCH_SPACE) -> int:
    size = 1
    for param in space_for(kinds, space):
        size *= len(param.choices)
    return size
