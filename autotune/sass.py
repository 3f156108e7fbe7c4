"""Offline SASS of the Triton kernels: instruction counts per loop without a GPU.

`python -m autotune bench sass [--kernel prefill|decode] [--set FIELD=VALUE ...]` compiles the
prefill attention kernel or the decode split kernel for sm_90 (Hopper) with the Triton and the
ptxas/cuobjdump that the triton wheel ships, and prints, for each loop of the kernel (a backward
branch), its instruction count per thread per iteration and the most frequent opcodes; plus
registers per thread and shared memory. The prefill's main loop iterates once per KV tile, the
decode's once per packed tile, so these counts are the per-tile costs that the roofline's
instruction constants cite (roofline/cost.py), and they show whether a change removed what it
meant to (conversion instructions: I2F, F2I, FRND; tensor-core ones: IGMMA, IMMA, HMMA).

How: a real launch of the kernel (tiny shapes, Triton's interpreter, the kernel object replaced by
a recorder) captures its arguments; their types and the constexprs become an ASTSource compiled
for the target. Both steps run in child processes, because TRITON_INTERPRET must be set (capture)
or unset (compile) before triton is imported. `gluon_prefill_sass` compiles kernels/prefill_gluon.py
(fixed signature, no capture) and `loop_schedule` lists a loop's tensor-core issues, waits and
exponentials in code order, which shows whether products overlap the softmax.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Any, NamedTuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = ("prefill", "decode")
TORCH_TO_TRITON = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64", "int8": "*i8",
                   "uint8": "*u8", "int16": "*i16", "int32": "*i32", "int64": "*i64", "float8_e4m3fn": "*fp8e4nv"}
LOOP_MIN_INSTRUCTIONS = 50  # shorter backward branches are address arithmetic, not the kernel's loops
_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_BRANCH = re.compile(r"^\s+/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P\w+\s+)?BRA\b.*?0x([0-9a-f]+)")


class Loop(NamedTuple):
    start: int  # byte address of the first instruction
    end: int  # address of the backward branch
    instructions: int  # per thread per iteration (straight-line count of the body)
    ops: dict[str, int]  # opcode (with modifiers) -> count


class SassReport(NamedTuple):
    kernel: str
    target: str
    num_warps: int
    num_stages: int
    registers: int
    shared_bytes: int
    total_instructions: int
    loops: list[Loop]
    constexprs: dict[str, Any]


def parse_sass(text: str) -> tuple[int, list[Loop]]:
    """(instruction count, loops) of cuobjdump -sass output; a loop is a backward BRA's range."""
    instr = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTR.match, text.splitlines()) if m]
    loops = []
    for line in text.splitlines():
        m = _BRANCH.match(line)
        if m and int(m.group(2), 16) < int(m.group(1), 16):
            lo, hi = int(m.group(2), 16), int(m.group(1), 16)
            ops = collections.Counter(op for addr, op in instr if lo <= addr <= hi)
            if sum(ops.values()) >= LOOP_MIN_INSTRUCTIONS:
                loops.append(Loop(lo, hi, sum(ops.values()), dict(ops.most_common())))
    return len(instr), loops


# ----------------------------------------------------------------------------- capture (interpreter)

def _capture(kernel: str, config_changes: dict, model: tuple[int, int, int], causal: bool, bits: int) -> dict:
    """Child process, TRITON_INTERPRET=1: run one launch with the kernel replaced by a recorder."""
    import torch

    from kernels import KernelConfig, reference

    hq, hkv, d = model
    config = KernelConfig().replace(**config_changes)
    seen: dict = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                seen.setdefault(self.name, (args, kwargs))
            return record

    if kernel == "prefill":
        import kernels.prefill as P
        from kernels.quant import quantize_kv_for

        target = P._flashq_fwd_kernel
        P._flashq_fwd_kernel = Recorder("main")
        try:
            q, k, v = reference.outlier_qkv(1, hq, hkv, 2 * config.block_n, d)
            kv = quantize_kv_for(q, k, v, config, d ** -0.5)
            P.launch_flashq(q, kv, torch.empty_like(q), causal, config, d ** -0.5)
        finally:
            P._flashq_fwd_kernel = target
        names = target.arg_names
    else:
        import kernels.cache as C

        target = C._decode_split_kernel
        saved = (C._decode_split_kernel, C._decode_reduce_kernel)
        C._decode_split_kernel, C._decode_reduce_kernel = Recorder("main"), Recorder("reduce")
        try:
            cfg = config.replace(bit_mix=0.0 if bits == 4 else 1.0)
            n = 4 * cfg.buffer_tokens
            cache = C.TurboKVCache(1, hkv, d, n + cfg.buffer_tokens, device="cpu", config=cfg)
            k = torch.randn(1, hkv, n, d, dtype=torch.float16)
            cache.prefill(k, torch.randn_like(k))
            new = torch.randn(1, hkv, 1, d, dtype=torch.float16)
            try:
                cache.decode(torch.randn(1, hq, 1, d, dtype=torch.float16), new, new)
            except Exception:  # the recorded split kernel wrote no partials: what follows may fail
                pass
        finally:
            C._decode_split_kernel, C._decode_reduce_kernel = saved
        names = target.arg_names
    if "main" not in seen:
        raise RuntimeError(f"the {kernel} kernel was not launched")
    args, kwargs = seen["main"]
    signature, divisible = {}, []
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = TORCH_TO_TRITON[str(value.dtype).replace("torch.", "")]
            divisible.append(name)
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and value != 0:
                divisible.append(name)
        else:
            raise TypeError(f"argument {name} of type {type(value).__name__} is not supported")
    launch = {key: kwargs.pop(key) for key in ("num_warps", "num_stages", "maxnreg") if key in kwargs}
    return dict(signature=signature, divisible=divisible, constexprs=kwargs,
                num_warps=launch.get("num_warps", config.num_warps if kernel == "prefill" else config.decode_num_warps),
                num_stages=launch.get("num_stages",
                                      config.num_stages if kernel == "prefill" else config.decode_num_stages),
                # a compiler option, which the interpreter's launch leaves out
                maxnreg=config.max_registers if kernel == "prefill" else None)


# ----------------------------------------------------------------------------- compile (no interpreter)

def _disassemble(compiled) -> tuple[str, int]:
    """(SASS text, registers per thread; -1 if not reported) of a compiled kernel, with the cuobjdump
    the triton wheel ships."""
    import triton

    tool = str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    if os.environ.get("TURBO_SASS_DUMP"):  # keep the listing, to read a loop's schedule by eye
        pathlib.Path(os.environ["TURBO_SASS_DUMP"]).write_text(sass)
    return sass, int(regs.group(1)) if regs else -1


def _compile(kernel: str, spec: dict, arch: int) -> SassReport:
    """Child process, no interpreter: compile the captured launch for sm_<arch>, disassemble it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if kernel == "prefill":
        from kernels.prefill import _flashq_fwd_kernel as fn
    else:
        from kernels.decode import _decode_split_kernel as fn
    constexprs = dict(spec["constexprs"])
    constexprs["FAST" if kernel == "decode" else "FAST_EXP"] = True  # the GPU's paths (inline PTX)
    signature = {name: ("constexpr" if name in constexprs else spec["signature"][name]) for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec["divisible"]}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    if spec.get("maxnreg") is not None:
        options["maxnreg"] = spec["maxnreg"]
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    sass, regs = _disassemble(compiled)
    total, loops = parse_sass(sass)
    return SassReport(kernel, f"sm_{arch}", spec["num_warps"], spec["num_stages"], regs,
                      int(compiled.metadata.shared), total, loops, spec["constexprs"])


def _compile_gluon_prefill(d: int, block_n: int, causal: bool, arch: int) -> tuple[SassReport, str]:
    """Child process, no interpreter: kernels.prefill_gluon's kernel compiled for sm_<arch> (its
    signature is fixed, so no launch needs capturing)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernels.config import REF_MAX_CLAMP
    from kernels.prefill_gluon import GLUON_BLOCK_M, LOG2_127, NUM_BUF, _gluon_flashq_kernel as fn

    types = dict(Qx="*fp16", KC="*i8", VT="*i8", KS="*fp32", VS="*fp32", SMOOTH="*fp32", Out="*fp16", fold="fp32")
    constexprs = dict(D=d, BM=GLUON_BLOCK_M, BN=block_n, SMOOTH_K=True, CAUSAL=causal, P_ROW=True,
                      REF_CLAMP=REF_MAX_CLAMP, LOG2_P_SCALE=LOG2_127, NUM_BUF=NUM_BUF, num_warps=4)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    aligned = [n for n in fn.arg_names if n in types and types[n].startswith("*") or n.startswith("stride")
               or n == "NK_PAD"]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    compiled = triton.compile(GluonASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    sass, regs = _disassemble(compiled)
    total, loops = parse_sass(sass)
    return SassReport("prefill-gluon", f"sm_{arch}", 4, NUM_BUF, regs,
                      int(compiled.metadata.shared), total, loops, constexprs), sass


def loop_schedule(sass: str, loop: Loop) -> list[str]:
    """The loop body's sequence of tensor-core issues ("G": IGMMA/HGMMA), waits for them ("W"),
    exponentials ("E": MUFU.EX2) and local-memory accesses ("S": spills), in code order."""
    out = []
    for m in map(_INSTR.match, sass.splitlines()):
        if not m or not loop.start <= int(m.group(1), 16) <= loop.end:
            continue
        op = m.group(2)
        tag = ("G" if op.startswith(("IGMMA", "HGMMA")) else "W" if op.startswith("WARPGROUP.DEPBAR")
               else "E" if op.startswith("MUFU.EX2") else "S" if op.startswith(("STL", "LDL")) else None)
        if tag:
            out.append(tag)
    return out


def gluon_prefill_sass(d: int = 128, block_n: int = 128, causal: bool = True, arch: int = 90) -> tuple[SassReport, str]:
    """(report, SASS text) of kernels.prefill_gluon's kernel; needs no GPU."""
    out = _child("gluon", dict(d=d, block_n=block_n, causal=causal, arch=arch))
    sass = out.pop("sass")
    out["loops"] = [Loop(**loop) for loop in out["loops"]]
    return SassReport(**out), sass


def _child(mode: str, payload: dict) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if mode == "capture":
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "autotune.sass", mode, json.dumps(payload)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"sass {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def offline_sass(kernel: str = "prefill", config_changes: dict | None = None, model: tuple[int, int, int] = (32, 8, 128),
                 causal: bool = True, bits: int = 4, arch: int = 90) -> SassReport:
    """SASS report of one kernel for one config (see the module docstring); needs no GPU.

    model: (Hq, Hkv, D); bits: the decode pool (4 or 2); config_changes: KernelConfig fields.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if bits not in (2, 4):
        raise ValueError(f"bits must be 4 or 2, got {bits!r}")
    from kernels import KernelConfig

    KernelConfig().replace(**(config_changes or {}))  # bad fields fail here, with the config's message
    spec = _child("capture", dict(kernel=kernel, config=config_changes or {}, model=list(model), causal=causal,
                                  bits=bits))
    out = _child("compile", dict(kernel=kernel, spec=spec, arch=arch))
    out["loops"] = [Loop(**loop) for loop in out["loops"]]
    return SassReport(**out)


def format_report(report: SassReport, top: int = 14) -> str:
    lines = [f"{report.kernel} {report.target}: {report.num_warps} warps, {report.num_stages} stages, "
             f"{report.registers} registers/thread, {report.shared_bytes} B shared, "
             f"{report.total_instructions} instructions"]
    for i, loop in enumerate(report.loops):
        ops = ", ".join(f"{op} {n}" for op, n in list(loop.ops.items())[:top])
        lines.append(f"  loop {i} [{loop.start:#x}..{loop.end:#x}]: {loop.instructions} instructions per thread "
                     f"per iteration\n    {ops}")
    return "\n".join(lines)


def _main(argv: list[str]) -> None:
    mode, payload = argv[0], json.loads(argv[1])
    if mode == "capture":
        result = _capture(payload["kernel"], payload["config"], tuple(payload["model"]), payload["causal"],
                          payload["bits"])
    elif mode == "gluon":
        report, sass = _compile_gluon_prefill(payload["d"], payload["block_n"], payload["causal"], payload["arch"])
        result = report._asdict()
        result["loops"] = [loop._asdict() for loop in report.loops]
        result["sass"] = sass
    else:
        report = _compile(payload["kernel"], payload["spec"], payload["arch"])
        result = report._asdict()
        result["loops"] = [loop._asdict() for loop in report.loops]
    print(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])
