"""Attention shapes of the models the tuner targets, as data, plus a reader for Hugging Face
config.json files, and the default workload (which prefill lengths and decode points to tune for).

Only the attention geometry matters to the cost model: layers, query and KV heads, head dim,
context length. Presets are taken from each model's published config.json.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple


class UnknownModelError(ValueError):
    """A model name that is neither a preset nor a readable config.json; the message lists presets."""


@dataclass(frozen=True)
class ModelSpec:
    """Attention geometry of one decoder model (num_q_heads % num_kv_heads == 0, i.e. GQA)."""

    key: str
    name: str
    layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    hidden: int

    def __post_init__(self) -> None:
        for field_name in ("layers", "num_q_heads", "num_kv_heads", "head_dim", "max_context", "hidden"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelSpec.{field_name} must be a positive int, got {value!r} (model {self.key!r})")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"ModelSpec.num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads}) (model {self.key!r})")

    @property
    def gqa_group(self) -> int:
        return self.num_q_heads // self.num_kv_heads


# Sources: the config.json of each Hugging Face repository named in `name`.
_PRESETS = (
    ModelSpec("phi3-mini", "microsoft/Phi-3-mini-4k-instruct", layers=32, num_q_heads=32, num_kv_heads=32,
              head_dim=96, max_context=4096, hidden=3072),
    ModelSpec("llama3-8b", "meta-llama/Meta-Llama-3-8B", layers=32, num_q_heads=32, num_kv_heads=8,
              head_dim=128, max_context=8192, hidden=4096),
    ModelSpec("llama3-70b", "meta-llama/Meta-Llama-3-70B", layers=80, num_q_heads=64, num_kv_heads=8,
              head_dim=128, max_context=8192, hidden=8192),
    ModelSpec("qwen2.5-7b", "Qwen/Qwen2.5-7B", layers=28, num_q_heads=28, num_kv_heads=4,
              head_dim=128, max_context=32768, hidden=3584),
    ModelSpec("mistral-7b", "mistralai/Mistral-7B-v0.3", layers=32, num_q_heads=32, num_kv_heads=8,
              head_dim=128, max_context=32768, hidden=4096),
    ModelSpec("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", layers=30, num_q_heads=9, num_kv_heads=3,
              head_dim=64, max_context=8192, hidden=576),
)

MODELS: Mapping[str, ModelSpec] = {spec.key: spec for spec in _PRESETS}

_ALIASES: Mapping[str, str] = {
    "phi3": "phi3-mini",
    "phi-3": "phi3-mini",
    "phi-3-mini": "phi3-mini",
    "phi3-mini-4k": "phi3-mini",
    "llama3": "llama3-8b",
    "llama-3-8b": "llama3-8b",
    "meta-llama-3-8b": "llama3-8b",
    "llama-3-70b": "llama3-70b",
    "meta-llama-3-70b": "llama3-70b",
    "qwen2.5": "qwen2.5-7b",
    "qwen": "qwen2.5-7b",
    "mistral": "mistral-7b",
    "smollm2": "smollm2-135m",
}


def _model_token(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "", name.strip().lower())


def _token_table() -> dict[str, str]:
    table = {}
    for key, spec in MODELS.items():
        table[_model_token(key)] = key
        table[_model_token(spec.name)] = key
        table[_model_token(spec.name.split("/")[-1])] = key
    for alias, key in _ALIASES.items():
        table[_model_token(alias)] = key
    return table


def known_models() -> list[str]:
    return sorted(MODELS)


def _required_int(config: Mapping, field: str, path: Path) -> int:
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{path}: field {field!r} must be a positive int, got {value!r}")
    return value


def model_from_hf_config(path: "str | os.PathLike") -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json (or a folder holding one).

    Reads num_hidden_layers, num_attention_heads, num_key_value_heads (default: num_attention_heads,
    i.e. no GQA), head_dim (default hidden_size / num_attention_heads), max_position_embeddings and
    hidden_size. Multimodal configs that nest the language model under "text_config" are read there.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read a Hugging Face config from {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    layers = _required_int(config, "num_hidden_layers", path)
    heads = _required_int(config, "num_attention_heads", path)
    hidden = _required_int(config, "hidden_size", path)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    max_context = _required_int(config, "max_position_embeddings", path)
    name = str(config.get("_name_or_path") or path.parent.name or path.stem)
    key = re.sub(r"[^a-z0-9.]+", "-", name.split("/")[-1].lower()).strip("-") or "custom"
    return ModelSpec(key=key, name=name, layers=layers, num_q_heads=heads, num_kv_heads=int(kv_heads),
                     head_dim=int(head_dim), max_context=max_context, hidden=hidden)


def resolve_model(name_or_path: "str | os.PathLike | ModelSpec") -> ModelSpec:
    """A preset by key or alias ("phi3", "llama3"), or a path to a Hugging Face config.json.

    Raises UnknownModelError listing the presets when the name is neither.
    """
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    text = os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else name_or_path
    if not isinstance(text, str) or not text.strip():
        raise UnknownModelError(f"model must be a preset name or a config.json path, got {name_or_path!r}; "
                                f"presets: {known_models()}")
    key = _token_table().get(_model_token(text))
    if key is not None:
        return MODELS[key]
    path = Path(text).expanduser()
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        return model_from_hf_config(path)
    raise UnknownModelError(f"unknown model {text!r}: not a preset and not a path to a Hugging Face config.json; "
                            f"presets: {known_models()}")


class WorkloadPoint(NamedTuple):
    """One shape the tuner optimises for: `kernel` "prefill" (seq_len = N) or "decode"
    (seq_len = context length), with a weight; weights of one kernel sum to 1."""

    kernel: str
    seq_len: int
    batch: int
    weight: float


class Workload(NamedTuple):
    model: ModelSpec
    prefill: tuple[WorkloadPoint, ...]
    decode: tuple[WorkloadPoint, ...]

    @property
    def points(self) -> tuple[WorkloadPoint, ...]:
        return self.prefill + self.decode


PREFILL_LENGTHS = (1024, 4096, 16384)
PREFILL_TOKENS_PER_BATCH = 16384  # batch = 16384 // N, as the DESIGN.md benchmark shapes (N=4096, B=4)
DECODE_CONTEXTS = (4096, 32768)
DECODE_BATCHES = (1, 8)


def default_workload(model: "str | ModelSpec") -> Workload:
    """Prefill N in {1024, 4096, 16384} and decode context in {4096, 32768} x batch {1, 8}, every
    length capped at the model's max_context (duplicates merged); equal weights per kernel.

    Prefill batch = max(1, 16384 // N), so every prefill point holds about 16k query tokens.
    """
    spec = resolve_model(model)
    lengths = sorted({min(n, spec.max_context) for n in PREFILL_LENGTHS})
    contexts = sorted({min(c, spec.max_context) for c in DECODE_CONTEXTS})
    prefill = tuple(WorkloadPoint("prefill", n, max(1, PREFILL_TOKENS_PER_BATCH // n), 1.0 / len(lengths))
                    for n in lengths)
    decode_shapes = [(ctx, b) for ctx in contexts for b in DECODE_BATCHES]
    decode = tuple(WorkloadPoint("decode", ctx, b, 1.0 / len(decode_shapes)) for ctx, b in decode_shapes)
    assert math.isclose(sum(p.weight for p in prefill), 1.0) and math.isclose(sum(p.weight for p in decode), 1.0)
    return Workload(spec, prefill, decode)
