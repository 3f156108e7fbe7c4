"""Offline SASS (autotune/sass.py): the kernels compiled for sm_90 without a GPU, loop by loop.

These pin what the kernels' inner loops are made of (the instruction classes the design relies on)
with Triton 3.6.0, the version CI installs: tensor-core INT8 products, no int/float conversion
instruction where the magic-number tricks replace them, and the threshold's selects as plain
FSETP + FSEL pairs (the compiler once parked them as register bits, three more per score).
"""

import pytest

from autotune.sass import offline_sass, parse_sass

CONVERSIONS = ("I2F", "F2I", "FRND", "I2FP")


def _has(loop, prefix):
    return sum(n for op, n in loop.ops.items() if op.startswith(prefix))


def test_parse_sass_finds_loops_and_counts():
    body = "".join(f"        /*{0x100 + 16 * i:04x}*/                   FFMA R1, R2, R3, R4 ;\n" for i in range(60))
    text = ("        /*0000*/                   MOV R1, c[0x0][0x28] ;\n" + body
            + f"        /*{0x100 + 16 * 60:04x}*/              @P0 BRA 0x100 ;\n"
            + f"        /*{0x100 + 16 * 61:04x}*/                   EXIT ;\n")
    total, loops = parse_sass(text)
    assert total == 63
    assert len(loops) == 1 and loops[0].instructions == 61 and loops[0].ops["FFMA"] == 60
    assert parse_sass(text.replace("BRA 0x100", "BRA 0x1000"))[1] == []  # a forward branch is no loop


def test_prefill_default_loop_is_tensor_core_and_conversion_free():
    report = offline_sass("prefill", {}, (32, 8, 128))
    main = report.loops[0]  # the unmasked KV loop
    assert _has(main, "IGMMA") >= 8  # INT8 wgmma for QK^T and PV
    assert _has(main, "MUFU.EX2") >= 64  # exp2 on the special-function unit, one per score
    assert not any(_has(main, c) for c in CONVERSIONS), main.ops
    assert main.instructions < 1000  # 853 at the change that added this test (861 with the tree reductions)
    # tl.dot waits for each product right after issuing it: one wait per product, no overlap of the
    # tensor cores with the softmax inside a program (kernels/prefill_gluon.py has one wait per tile)
    assert _has(main, "WARPGROUP.DEPBAR") == 2


def test_prefill_sas_threshold_loop_has_no_conversion_and_no_predicate_unpacking():
    report = offline_sass("prefill", {"use_sas": True, "sparsity_threshold": 8.0}, (32, 8, 128))
    main = report.loops[0]
    assert _has(main, "FADD.RM") >= 64  # the SAS floor as a rounding add against the magic number
    assert not any(_has(main, c) for c in CONVERSIONS), main.ops
    assert _has(main, "MUFU.EX2") < 16  # SAS exponentials on the FMA pipe (a few exp2 per row remain)
    assert _has(main, "SHF.R.U64") == 0  # no predicates parked as register bits
    assert main.instructions < 1500  # 1404 at the change that added this test (was 1520)


def _longest_chain(sass: str, loop, opcode: str) -> int:
    """Longest run of `opcode` instructions (in code order within the loop) each reading the register
    the previous one of the run wrote: the dependent chain a row reduction walks."""
    import re

    pattern = re.compile(r"/\*([0-9a-f]{4,6})\*/\s+" + re.escape(opcode) + r"\s+(R\d+),\s*(R\d+),\s*(R\d+)")
    longest, last_dst, run = 0, {}, {}
    for m in pattern.finditer(sass):
        if not loop.start <= int(m.group(1), 16) < loop.end:
            continue
        dst, srcs = m.group(2), (m.group(3), m.group(4))
        depth = 1 + max((run.get(r, 0) for r in srcs), default=0)
        run = {k: v for k, v in run.items() if k != dst}
        run[dst] = depth
        longest = max(longest, depth)
    return longest


def test_prefill_row_reductions_are_trees(tmp_path, monkeypatch):
    """The row max folds column halves before the cross-lane step: its FMNMX chain is ~log2 deep (a
    plain tl.max walked 32 values one after another: a 32-deep chain per row and tile)."""
    monkeypatch.setenv("TURBO_SASS_DUMP", str(tmp_path / "prefill.sass"))
    report = offline_sass("prefill", {}, (32, 8, 128))
    sass = (tmp_path / "prefill.sass").read_text()
    assert _longest_chain(sass, report.loops[0], "FMNMX") <= 10


def test_prefill_fp8_pv_loop():
    """compute_format "fp8_pv": INT8 QK^T and an FP8 PV product (QGMMA) from P packed two scores per
    F2FP, no INT8 P bytes; fewer instructions per tile than the INT8 loop."""
    fp8 = offline_sass("prefill", {"compute_format": "fp8_pv"}, (32, 8, 128)).loops[0]
    int8 = offline_sass("prefill", {}, (32, 8, 128)).loops[0]
    assert _has(fp8, "IGMMA") >= 4 and _has(fp8, "QGMMA") >= 4, fp8.ops
    assert _has(fp8, "F2FP.SATFINITE.E4M3") == 32  # 64 scores per thread and tile, two per conversion
    assert not any(_has(fp8, c) for c in CONVERSIONS), fp8.ops
    assert fp8.instructions < 0.85 * int8.instructions  # 674 against 861 at the change that added this


@pytest.mark.parametrize("bits", [4])
def test_decode_packed_loop_uses_int8_scores(bits):
    report = offline_sass("decode", {}, (32, 8, 128), bits=bits)
    pool4 = report.loops[1]  # code order: buffer, 4-bit pool, 2-bit pool
    assert _has(pool4, "IMMA") >= 8  # INT8 scores of the raw codes
    assert _has(pool4, "HMMA") >= 16  # fp16 PV of the unpacked codes
    assert pool4.instructions < 1000  # 901 at the change that added this test


def test_register_cap_reaches_the_compiler():
    """max_registers (Triton's maxnreg) caps the prefill's registers; the compiler spills the rest."""
    report = offline_sass("prefill", {"max_registers": 168, "num_stages": 2}, (32, 8, 128))
    assert report.registers == 168
    assert _has(report.loops[0], "STL") + _has(report.loops[0], "LDL") > 0
