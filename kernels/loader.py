"""Runtime loader of tuned configs: versioned JSON documents (DESIGN.md section 5) -> KernelConfig.

Search order: the folder named by $TURBO_CONFIG_DIR, then the packaged kernels/configs/, then the
documented heuristic default (`heuristic_config`). A document is matched by what it says inside
(its "gpu" key or "gpu_name", its "model", its head_dim), never by its file name. A document
with an unknown schema version, an invalid body, a Triton major version other than the running
one, or tuned on another GPU is not used: the loader warns once, naming the file and the reason,
and falls back. Which file was used is logged once (logger "kernels.loader").
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import warnings
from typing import Any, Mapping

from .config import KernelConfig

SCHEMA_VERSION = 1
ENV_DIR = "TURBO_CONFIG_DIR"
PACKAGED_DIR = pathlib.Path(__file__).resolve().parent / "configs"
_log = logging.getLogger("kernels.loader")
_said: set[str] = set()

PREFILL_KEYS = {"max_seq_len": "max_seq_len", "BLOCK_M": "block_m", "BLOCK_N": "block_n",
                "num_warps": "num_warps", "num_stages": "num_stages", "maxnreg": "max_registers"}
DECODE_KEYS = {"max_ctx": "max_ctx", "BLOCK_N": "decode_block_n", "num_splits": "num_splits",
               "num_warps": "decode_num_warps", "num_stages": "decode_num_stages", "q_split": "decode_q_split"}
QUANT_KEYS = ("bit_mix", "sparsity_threshold", "buffer_tokens", "use_sas", "p_scale", "smooth_k", "balance", "v_group")
REQUIRED = ("schema_version", "gpu", "gpu_name", "model", "source", "created", "toolchain", "prefill", "decode", "quant")


class ConfigDocumentError(ValueError):
    """A tuned-config document that does not follow the schema."""


def _say_once(message: str, warn: bool) -> None:
    if message in _said:
        return
    _said.add(message)
    if warn:
        warnings.warn(message, stacklevel=3)
    else:
        _log.info(message)


SMALL_SMEM_BYTES = 160 * 1024  # below this per-block shared memory, 3 stages of 128-token K/V tiles do not fit


def _smem_per_block() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            return int(getattr(props, "shared_memory_per_block_optin", 0) or 0) or None
    except Exception:
        pass
    return None


def heuristic_config(head_dim: int | None = None, seq_len: int | None = None,
                     smem_per_block: int | None = None) -> KernelConfig:
    """The documented default: KernelConfig() (Br=64, Bc=128, 4 warps, 3 stages: best measured on an
    H100 for N >= 4096); short sequences (N <= 64) take Br=32 so fewer rows are padding; GPUs
    with less than 160 KB of shared memory per block (L4, A10G, RTX 4090/3090: 99-100 KB) take 2
    stages, which fit. smem_per_block None = read it from the local GPU (if any)."""
    smem = smem_per_block if smem_per_block is not None else _smem_per_block()
    config = KernelConfig()
    if seq_len is not None and seq_len <= 64:
        config = config.replace(block_m=32, block_n=64)
    if smem is not None and smem < SMALL_SMEM_BYTES:
        config = config.replace(num_stages=2)
    return config


def validate_document(doc: Any) -> None:
    """Raise ConfigDocumentError naming every problem of a tuned-config document."""
    if not isinstance(doc, Mapping):
        raise ConfigDocumentError(f"a tuned config must be a JSON object, got {type(doc).__name__}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ConfigDocumentError(f"unknown schema_version {doc.get('schema_version')!r}; this loader reads {SCHEMA_VERSION}")
    problems = [f"missing field {k!r}" for k in REQUIRED if k not in doc]
    if doc.get("source") not in ("measured", "predicted"):
        problems.append(f"source must be 'measured' or 'predicted', got {doc.get('source')!r}")
    for kind, keys in (("prefill", PREFILL_KEYS), ("decode", DECODE_KEYS)):
        entries = doc.get(kind)
        if not isinstance(entries, list):
            problems.append(f"{kind} must be a list of entries")
            continue
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or set(entry) - set(keys):
                problems.append(f"{kind}[{i}] must have only the keys {sorted(keys)}")
    if problems:
        raise ConfigDocumentError("; ".join(problems))
    try:
        for entry in doc["prefill"] + doc["decode"]:
            _to_config(doc, entry, entry)
        _to_config(doc, None, None)
    except (ValueError, TypeError) as exc:
        raise ConfigDocumentError(f"values out of range: {exc}") from None


def _to_config(doc: Mapping, prefill: Mapping | None, decode: Mapping | None) -> KernelConfig:
    fields: dict[str, Any] = {k: doc["quant"][k] for k in QUANT_KEYS if k in doc.get("quant", {})}
    if prefill:
        fields.update({PREFILL_KEYS[k]: v for k, v in prefill.items() if k in PREFILL_KEYS and k != "max_seq_len"})
    if decode:
        fields.update({DECODE_KEYS[k]: v for k, v in decode.items() if k in DECODE_KEYS and k != "max_ctx"})
    return KernelConfig(**fields)


def _pick(entries: list, length_key: str, length: int | None):
    if not entries:
        return None
    ordered = sorted(entries, key=lambda e: e.get(length_key, 0))
    if length is None:
        return ordered[-1]
    for entry in ordered:
        if entry.get(length_key, 0) >= length:
            return entry
    return ordered[-1]


def config_from_document(doc: Mapping, seq_len: int | None = None, ctx: int | None = None) -> KernelConfig:
    """The KernelConfig a document gives for prefill length `seq_len` and decode context `ctx`."""
    validate_document(doc)
    return _entry_config(doc, seq_len, ctx)


def _entry_config(doc: Mapping, seq_len: int | None, ctx: int | None) -> KernelConfig:
    """config_from_document for a document already validated (every one `documents()` returns)."""
    return _to_config(doc, _pick(doc["prefill"], "max_seq_len", seq_len), _pick(doc["decode"], "max_ctx", ctx))


def search_dirs() -> list[pathlib.Path]:
    dirs = []
    if os.environ.get(ENV_DIR):
        dirs.append(pathlib.Path(os.environ[ENV_DIR]))
    dirs.append(PACKAGED_DIR)
    return dirs


@functools.lru_cache(maxsize=64)
def _read(path: str, mtime: float) -> dict | None:
    try:
        doc = json.loads(pathlib.Path(path).read_text())
        validate_document(doc)
        return doc
    except (OSError, json.JSONDecodeError, ConfigDocumentError) as exc:
        _say_once(f"kernels.loader: ignoring {path}: {exc}", warn=True)
        return None


def documents() -> list[tuple[pathlib.Path, dict]]:
    """Every valid document in the search folders, in search order."""
    out = []
    for folder in search_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            doc = _read(str(path), path.stat().st_mtime)
            if doc is not None:
                out.append((path, doc))
    return out


def _local_gpu() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:
        pass
    return None


def _triton_major() -> str | None:
    try:
        import triton

        return triton.__version__.split(".")[0]
    except Exception:
        return None


def _folder_state() -> tuple:
    """The search folders and their modification times: a new, removed or renamed file changes it."""
    return tuple((str(d), d.stat().st_mtime_ns if d.is_dir() else None) for d in search_dirs())


def find_document(gpu: str | None, model: str | None = None, head_dim: int | None = None):
    """(path, document) for this GPU and model, or (None, reason) after the fallbacks.

    Cached until a search folder changes, so that turbo_attention(config=None) does not list,
    read and validate the folders on every call.
    """
    return _find_document(gpu, model, head_dim, _folder_state())


@functools.lru_cache(maxsize=64)
def _find_document(gpu: str | None, model: str | None, head_dim: int | None, state: tuple):
    other_gpu = None
    for path, doc in documents():
        if model is not None and doc["model"] != model:
            continue
        if head_dim is not None and doc.get("geometry", {}).get("head_dim", head_dim) != head_dim:
            continue
        if gpu is None or gpu not in (doc["gpu"], doc["gpu_name"]):
            other_gpu = other_gpu or path
            continue
        tuned_major = str(doc["toolchain"].get("triton", "")).split(".")[0]
        running = _triton_major()
        if tuned_major and running and tuned_major != running:
            _say_once(f"kernels.loader: not using {path}: tuned with Triton {doc['toolchain'].get('triton')}, "
                      f"running Triton {running}.x; using the heuristic default", warn=True)
            continue
        return path, doc
    if other_gpu is not None:
        return None, f"{other_gpu} was tuned on another GPU (this one: {gpu or 'none'})"
    return None, "no tuned config for this GPU/model"


def load_config(gpu: str | None = None, model: str | None = None, head_dim: int | None = None,
                seq_len: int | None = None, ctx: int | None = None) -> KernelConfig:
    """The tuned KernelConfig for (gpu, model), or the heuristic default (saying why, once).

    gpu: a key ("h100-sxm") or the device name NVML/torch report; None = the local GPU.
    model: a model key ("llama3-8b"); None = any document for this GPU with this head_dim.
    seq_len / ctx pick the prefill / decode entry whose max length covers them.
    """
    gpu = gpu if gpu is not None else _local_gpu()
    path, found = find_document(gpu, model, head_dim)
    if path is None:
        _say_once(f"kernels.loader: {found}; using the heuristic default config", warn=gpu is not None and model is not None)
        return heuristic_config(head_dim, seq_len)
    _say_once(f"kernels.loader: using {path} ({found['source']}, {found['gpu']}, {found['model']})", warn=False)
    return _entry_config(found, seq_len, ctx)
