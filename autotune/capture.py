"""Capture real attention inputs: per-layer Q/K/V of a local Hugging Face model, for calibration.

`python -m autotune capture --hf-model smollm2 --out calib.pt [--prompts FILE] [--max-tokens N]
[--layers 0,14,29] [--dtype float16]` runs each prompt through the model (one sequence at a time,
no padding, no KV cache) and saves, per prompt and selected layer, exactly the q, k, v that the
model's attention function receives: after the rotary embedding, K/V not repeated for GQA
([1, Hq, N, D] and [1, Hkv, N, D]), with the softmax scale the model uses. The model's own output
is unchanged while capturing (the hook hands the call back to transformers' SDPA attention).

`load_calibration(path)` reads such a file back; the tuner's accuracy objective uses it.

File format (torch.save of plain containers, readable with torch.load(weights_only=True)):
  {"format": "turboattention-calibration", "version": 1, "model": name, "source": path,
   "num_layers", "num_q_heads", "num_kv_heads", "head_dim", "dtype", "created",
   "prompts": [token count per prompt],
   "samples": [{"layer", "prompt", "q", "k", "v", "sm_scale", "causal"}, ...]}
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
from typing import NamedTuple

import torch

from .hfmodel import AttentionCall, attention_handler, encode_text, load_model, model_shape

FORMAT = "turboattention-calibration"
VERSION = 1
DEFAULT_PROMPTS = pathlib.Path(__file__).resolve().parent / "data" / "a-case-of-identity.txt"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CalibrationSample(NamedTuple):
    """One layer's attention inputs for one prompt (what the tuner's accuracy objective consumes)."""

    model: str
    layer: int
    prompt: int
    q: torch.Tensor  # [1, Hq, N, D]
    k: torch.Tensor  # [1, Hkv, N, D]
    v: torch.Tensor  # [1, Hkv, N, D]
    sm_scale: float
    causal: bool


def load_calibration(path: str | pathlib.Path, layers: list[int] | None = None) -> list[CalibrationSample]:
    """The samples of a file written by `python -m autotune capture`, in file order (prompt, layer).

    `layers` keeps only those layers. Each sample's q, k, v feed `kernels.reference` and
    `kernels.turbo_attention` as they are (causal, with `sm_scale`). Raises ValueError for a file of
    another format or version.
    """
    data = torch.load(pathlib.Path(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a TurboAttention calibration file (format {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: calibration format version {data.get('version')!r}, this code reads {VERSION}")
    keep = None if layers is None else set(layers)
    return [CalibrationSample(data["model"], int(s["layer"]), int(s["prompt"]), s["q"], s["k"], s["v"],
                              float(s["sm_scale"]), bool(s["causal"]))
            for s in data["samples"] if keep is None or int(s["layer"]) in keep]


def read_prompts(path: str | pathlib.Path) -> list[str]:
    """A .jsonl file: one prompt per line (a JSON string or an object with "text"); any other file: one prompt."""
    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return [text]
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if isinstance(item, dict):
            item = item.get("text")
        if not isinstance(item, str):
            raise ValueError(f"{path}:{number}: expected a JSON string or an object with a \"text\" string")
        prompts.append(item)
    return prompts


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """"all" / None, or comma-separated indices and ranges ("0,14,29", "0-3,-1"); negatives count from the end."""
    if spec is None or spec == "all":
        return list(range(num_layers))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        idx = range(int(lo), int(hi) + 1) if sep else [int(lo)]
        for i in idx:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ValueError(f"layer {i} out of range for a model with {num_layers} layers")
            out.add(j)
    return sorted(out)


def capture(lm, prompts: list[torch.Tensor], layers: list[int], dtype: torch.dtype = torch.float16) -> list[dict]:
    """Run each prompt (1-D token ids) and collect the selected layers' q, k, v (CPU, `dtype`)."""
    wanted = set(layers)
    samples: list[dict] = []
    prompt_index = 0

    def record(call: AttentionCall):
        if call.layer in wanted:
            samples.append({"layer": call.layer, "prompt": prompt_index, "sm_scale": call.sm_scale, "causal": call.causal,
                            **{name: t.detach().to("cpu", dtype).contiguous() for name, t in
                               (("q", call.q), ("k", call.k), ("v", call.v))}})
        return None  # the model's own (SDPA) attention computes the output

    device = next(lm.model.parameters()).device
    with torch.no_grad(), attention_handler(lm.model, record):
        for prompt_index, ids in enumerate(prompts):
            lm.model(input_ids=ids[None].to(device), use_cache=False)
    return samples


def save_calibration(path: str | pathlib.Path, lm, prompts: list[torch.Tensor], layers: list[int],
                     dtype: torch.dtype = torch.float16) -> list[dict]:
    """Capture `prompts` (1-D token ids) on the selected layers and write the file `load_calibration` reads."""
    samples = capture(lm, prompts, layers, dtype)
    data = {"format": FORMAT, "version": VERSION, "model": lm.source.name,
            "source": str(pathlib.Path(lm.source.folder) / (lm.source.gguf_file or "")), **model_shape(lm.model),
            "dtype": str(dtype).replace("torch.", ""),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "prompts": [int(p.numel()) for p in prompts], "samples": samples}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return samples


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autotune capture", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-model", default="smollm2", help="preset (smollm2, smollm2-135m), model folder or .gguf file")
    p.add_argument("--out", required=True, help="calibration file to write (torch.save)")
    p.add_argument("--prompts", default=None, help=".jsonl (one prompt per line) or a text file (one prompt); "
                   "default: the shipped public-domain text")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens kept per prompt (default 512)")
    p.add_argument("--layers", default="all", help='"all" or indices/ranges, e.g. "0,14,29" or "0-3,-1"')
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="stored dtype (default float16)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        raise SystemExit("--max-tokens must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = load_model(args.hf_model, device=device)
    shape = model_shape(lm.model)
    layers = parse_layers(args.layers, shape["num_layers"])
    texts = read_prompts(args.prompts or DEFAULT_PROMPTS)
    prompts = [ids[:args.max_tokens] for ids in (encode_text(lm.tokenizer, t) for t in texts)]
    prompts = [ids for ids in prompts if ids.numel() > 0]
    if not prompts:
        raise SystemExit("no prompt has any token")
    out = pathlib.Path(args.out)
    samples = save_calibration(out, lm, prompts, layers, DTYPES[args.dtype])
    size = out.stat().st_size / 2**20
    print(f"{lm.source.name}: {len(prompts)} prompt(s) of {[int(p.numel()) for p in prompts]} tokens, "
          f"{len(layers)} layer(s) -> {len(samples)} samples, {size:.1f} MiB in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
