"""Export a study's winner as the versioned JSON document that kernels.load_config reads (DESIGN section 5).

Only COMPLETE, feasible trials are considered. The file is written atomically (a temporary file in
the same folder, then os.replace), so two workers never leave a torn document; passwords in the
storage URL are masked before they reach the document.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import pathlib
import re
import tempfile
from typing import Any

from kernels.config import KernelConfig
from kernels.loader import DECODE_KEYS, PREFILL_KEYS, QUANT_KEYS, SCHEMA_VERSION, validate_document

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "configs"


def mask_url(url: str | None) -> str | None:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db (and any password=... query)."""
    if not url:
        return url
    url = re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
    return re.sub(r"(password=)[^&\s]+", r"\1***", url, flags=re.I)


def toolchain() -> dict[str, str]:
    import torch
    import triton

    return {"triton": triton.__version__, "torch": torch.__version__, "cuda": str(torch.version.cuda or "none")}


def feasible_complete(study) -> list:
    import optuna

    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if all(c <= 0 for c in t.user_attrs.get("constraint", [1.0])) and "config" in t.user_attrs:
            values = t.values or []
            if values and all(v is not None and math.isfinite(v) for v in values):
                out.append(t)
    return out


def best_trial(study):
    """The feasible COMPLETE trial with the lowest latency (first objective), or None."""
    trials = feasible_complete(study)
    return min(trials, key=lambda t: t.values[0]) if trials else None


def build_document(config: KernelConfig, *, gpu: str, gpu_name: str, model: str, geometry: dict, source: str,
                   study: dict, workload, metrics: dict) -> dict[str, Any]:
    values = config.to_dict()
    inverse_prefill = {v: k for k, v in PREFILL_KEYS.items()}
    inverse_decode = {v: k for k, v in DECODE_KEYS.items()}
    prefill = []
    if workload.kinds.prefill:
        entry = {"max_seq_len": max(workload.max_prefill_len, 1)}
        entry.update({inverse_prefill[f]: values[f] for f in ("block_m", "block_n", "num_warps", "num_stages")})
        if values["max_registers"] is not None:
            entry["maxnreg"] = values["max_registers"]
        prefill.append(entry)
    decode = []
    if workload.kinds.decode:
        entry = {"max_ctx": max(workload.max_decode_ctx, 1)}
        entry.update({inverse_decode[f]: values[f] for f in ("decode_block_n", "num_splits", "decode_num_warps",
                                                             "decode_num_stages", "decode_q_split")})
        decode.append(entry)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "gpu": gpu,
        "gpu_name": gpu_name,
        "model": model,
        "geometry": geometry,
        "source": source,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "toolchain": toolchain(),
        "study": {k: (mask_url(v) if k == "storage" else v) for k, v in study.items()},
        "prefill": prefill,
        "decode": decode,
        "quant": {k: values[k] for k in QUANT_KEYS},
        # JSON has no NaN: a metric that does not apply (KV compression without decode) is null
        "metrics": {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()},
    }
    validate_document(doc)
    return doc


def write_document(doc: dict, out: str | os.PathLike | None = None) -> pathlib.Path:
    """Write atomically to `out` (a .json path or a folder; default kernels/configs/<gpu>--<model>.json)."""
    target = pathlib.Path(out) if out else DEFAULT_OUT
    if target.suffix != ".json":
        target.mkdir(parents=True, exist_ok=True)
        target = target / f"{doc['gpu']}--{doc['model']}.json"
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=2, sort_keys=False, allow_nan=False)
            fh.write("\n")
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def installed_documents() -> list[tuple[pathlib.Path, dict]]:
    from kernels.loader import documents

    return documents()
