"""The GPU-session tools in scripts/, exercised on the CPU so that they do not rot between
the rare sessions with a GPU (the first run of profile_gpu.py's summary printed no metric)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PACKAGE_PARENT

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "scripts").is_dir():
    pytest.skip("scripts/ is not beside tests/ (tests run outside a source tree)", allow_module_level=True)


def _needs_triton_interpreter():
    """Skip unless Triton's interpreter can run fastnca's kernels here (the scripts' CPU
    runs use it; triton < 3.4 cannot: their rows would all say "failed")."""
    pytest.importorskip("triton")
    from fastnca import _backend

    why = _backend._interpreter_problem()
    if why:
        pytest.skip(why)

# What `ncu --csv --page details --print-units base` writes: 20 header columns, but data
# rows stop after "Metric Value" (plus one empty field) when no rule fired.
NCU_CSV = '''==PROF== Connected to process 1
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value","Rule Name","Rule Type","Rule Description","Estimated Speedup Type","Estimated Speedup"
"0","7","python3","127.0.0.1","_nca_step_backward_cell_kernel","1","7","(128, 1, 1)","(264, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","ns","574,656",
"0","7","python3","127.0.0.1","_nca_step_backward_cell_kernel","1","7","(128, 1, 1)","(264, 1, 1)","0","9.0","Launch Statistics","Registers Per Thread","register/thread","255",
"1","7","python3","127.0.0.1","_nca_step_backward_conv_kernel","1","7","(128, 1, 1)","(531, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","ns","122,656","SOLBottleneck","OPT","text","global","0.5"
'''


def test_profile_summary_reads_ncu_rows(tmp_path):
    report = tmp_path / "report.csv"
    report.write_text(NCU_CSV)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_gpu.py"), "--summarize", str(report)],
                         capture_output=True, text=True, check=True).stdout
    cell, conv = out.split("1 _nca_step_backward_conv_kernel")
    assert "0 _nca_step_backward_cell_kernel" in cell
    assert "Duration" in cell and "574,656 ns" in cell and "255 register/thread" in cell
    assert "122,656 ns" in conv


# An `ncu --page source --csv --print-source cuda` export as the ncu-source stage reads it:
# a header per kernel table, per-line metrics with thousands separators.
NCU_SOURCE_CSV = '''==PROF== Connected to process 1
"#","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","Instructions Executed"
"10","    acc = tl.dot(a, b, acc)","1,200","900","4,096"
"11","    x = tl.load(p)","300","100","1,024"
"12","    return acc","0","0","128"
"#","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","Instructions Executed"
"7","    tl.store(q, y)","50","10","64"
'''


def test_profile_source_summary_ranks_lines_by_stalls(tmp_path):
    report = tmp_path / "source.csv"
    report.write_text(NCU_SOURCE_CSV)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_gpu.py"), "--summarize-source",
                          str(report)], capture_output=True, text=True, check=True).stdout
    first, second = out.split("table 1:")
    assert "3 lines, 1500 warp-stall samples" in first
    assert first.index("tl.dot") < first.index("tl.load")  # most stalls first
    assert " 80.0%" in first and " 20.0%" in first
    assert "tl.store" in second and "100.0%" in second
    empty = tmp_path / "empty.csv"
    empty.write_text("==PROF== No kernels were profiled.\n")
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_gpu.py"), "--summarize-source", str(empty)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "no source table" in res.stdout and "No kernels were profiled" in res.stdout


def test_backward_variants_smoke():
    """nca_backward_variants.py under the Triton interpreter: the accumulator paths (the
    gemm one included) run and agree (the CPU has no CUDA backward to compare with)."""
    _needs_triton_interpreter()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "nca_backward_variants.py"), "--device", "cpu",
                          "--rule", "8,16,2,1,1", "--shape", "1,5,6", "--tiles", "",
                          "--acc", "registers", "memory", "gemm", "chunked",
                          "--prec", "tf32x3", "tf32x3-all", "--dtype", "float32"],
                         capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    rows = [line for line in out.splitlines() if "triton tile=" in line]
    assert len(rows) == 8 and "failed" not in out, out
    for row in rows[1:]:
        assert float(row.split("2-norm")[1]) < 1e-5, row  # same fp32 math, summed in another order


TRITON30 = os.environ.get("FASTNCA_TEST_TRITON30")


@pytest.mark.skipif(not TRITON30, reason="FASTNCA_TEST_TRITON30 (a pip --target folder holding triton 3.0.0) "
                                         "is not set; .ci/run sets it")
@pytest.mark.parametrize("acc,half_weights", [("", ""), ("gemm", ""), ("chunked", ""), ("", "0")],
                         ids=["default", "gemm", "chunked", "fp32-weights"])
def test_kernels_compile_with_triton_3_0(acc, half_weights):
    """Every Triton kernel compiles for sm_90 with Triton 3.0, the oldest supported (torch
    2.4's): scripts/triton_sm90_resources.py on the Med-NCA rule (bfloat16; a state below
    _COMPACT_BACKWARD_CELLS, and in the default and =chunked modes one at it: the
    every-cell and the listed walk), a depthwise one
    (float32) and GeCA's attention, in each backward mode, with the bfloat16 weight copy
    (the default) and without it; the states channels_last in the default and =chunked
    modes (the im2col conv), NCHW in the others (the tap loop). Nothing else tests 3.0: CI
    installs the newest Triton and the lent GPUs have 3.6 (an nca compile error on 3.0 went
    unseen until 2026-11-27)."""
    im2col = acc in ("", "chunked") and half_weights == ""  # these modes also take the listed walk
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TRITON30, PACKAGE_PARENT]),
           "FASTNCA_TRITON_NCA_BWD_ACC": acc, "FASTNCA_TRITON_NCA_HALF_WEIGHTS": half_weights,
           "LAYOUT": "channels_last" if im2col else ""}
    env.pop("TRITON_INTERPRET", None)
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == "3.0.0", version
    # the listed walk (a state of _COMPACT_BACKWARD_CELLS) in the default and =chunked modes
    listed = ["2,32,256,256,128,2,1,1,bfloat16"] if im2col else []
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_sm90_resources.py"),
                          "8,32,64,64,128,2,1,1,bfloat16", *listed, "8,16,64,64,128,3,16,4",
                          "na:2,16,16,4,32,3,zeros,bfloat16"],
                         env=env, capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "Error" not in out, out[-3000:]
    # the hidden-chunk cell kernel under =chunked; under =gemm too, but the bfloat16 rule
    # takes the other one on a GPU (kernels/triton/nca_step._takes_hidden_chunks)
    n = 2 + len(listed)
    cells = {"": {"_nca_step_backward_cell_kernel": n}, "chunked": {"_nca_step_backward_cell_gemm_kernel": n},
             "gemm": {"_nca_step_backward_cell_kernel": 1, "_nca_step_backward_cell_gemm_kernel": 1}}[acc]
    for kernel, k in (*cells.items(), ("_nca_step_forward_kernel", n), ("_nca_step_backward_conv_kernel", n),
                      ("_nca_step_backward_input_kernel", n), ("_list_firing_kernel", len(listed)),
                      ("_na2d_forward_kernel", 1), ("_na2d_backward_kernel", 1)):
        assert out.count(f"{kernel}:") == k, (kernel, out[-3000:])


def test_sm90_matrix_reports_each_case(tmp_path):
    """scripts/triton_sm90_matrix.sh runs every case in its own process with the case's knobs,
    reports each case's spill stacks, and names every failing case and exits 1 (here with a
    stand-in for Python that fails the halo attention cases and spills in the bfloat16
    Med-NCA rule)."""
    stub = tmp_path / "python"
    stub.write_text("""#!/bin/sh
[ "$FASTNCA_TRITON_NA_FORWARD" = halo ] && { echo 'Traceback: CompilationError' >&2; exit 1; }
case "$2" in 8,32,64,64,128,2,1,1,bfloat16) echo "k: REG:255 STACK:672";; *) echo "k: REG:90 STACK:0";; esac
echo "k2: REG:32 STACK:0"
""")
    stub.chmod(0o755)
    res = subprocess.run(["bash", str(ROOT / "scripts" / "triton_sm90_matrix.sh")], env={**os.environ, "PY": str(stub)},
                         capture_output=True, text=True, timeout=300)
    lines = res.stdout.splitlines()
    fails = [ln for ln in lines if ln.startswith("FAIL")]
    oks = [ln for ln in lines if ln.startswith("ok")]
    assert res.returncode == 1, res.stdout[-2000:]
    assert len(fails) == 24 and all(ln.startswith("FAIL [na halo ") for ln in fails), fails
    assert len(oks) == 128 and all(ln.endswith("2 kernels; ") or "STACK:672" in ln for ln in oks), oks
    spilled = [ln.split("] ")[0] for ln in oks if "STACK:672" in ln]  # that rule in each mode and walk
    assert len(spilled) == 12 and "ok   [nca 8,32,64,64,128,2,1,1,bfloat16" in spilled, spilled
    assert "ok   [nca regs gemm 8,32,64,64,128,2,1,1,bfloat16" in spilled, spilled  # the register caps
    assert "ok   [nca listed 8,32,64,64,128,2,1,1,bfloat16" in spilled, spilled
    assert "CompilationError" in res.stdout


def test_backward_variants_explicit_list():
    """--variant TILE[/INPUT_TILE]:ACC:PREC runs exactly the listed variants, in order, an
    input-gradient tile (with a register cap) too; a malformed one is refused."""
    _needs_triton_interpreter()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "nca_backward_variants.py"), "--device", "cpu",
           "--rule", "8,16,2,1,1", "--shape", "1,5,6", "--dtype", "float32", "--rounds", "1", "--variant",
           "default:default:default", "16,4:chunked:default", "default:gemm:split-bwd",
           "16,4,1,128/default:default:default", "default/32,4,1,96:default:default"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    rows = [line.split()[:3] for line in out.splitlines() if "triton tile=" in line]
    assert rows == [["triton", "tile=default", "acc=default"], ["triton", "tile=16,4", "acc=chunked"],
                    ["triton", "tile=default", "acc=gemm"], ["triton", "tile=16,4,1,128", "acc=default"],
                    ["triton", "tile=default", "input=32,4,1,96"]] and "failed" not in out, out
    bad = subprocess.run(cmd[:-5] + ["default:gemm"], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode != 0 and "TILE[/INPUT_TILE]:ACC:PREC" in bad.stderr
    # a precision of no known name (half-weights: the default since 2026-11-28) is refused,
    # not timed as 3xTF32 under its name
    for args in (["--variant", "default:default:half-weights"], ["--prec", "half-weights"]):
        bad = subprocess.run(cmd[:-6] + args, capture_output=True, text=True, env=env, timeout=600)
        assert bad.returncode != 0 and "precision 'half-weights': choose from" in bad.stderr, bad.stderr


def test_backward_variants_rollout_smoke():
    """nca_backward_variants.py --rollout under the Triton interpreter: eager PyTorch, the
    Triton backend and each of its opt-in modes are timed in interleaved rounds."""
    _needs_triton_interpreter()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "nca_backward_variants.py"), "--device", "cpu",
                          "--rule", "8,16,2,1,1", "--shape", "1,5,6", "--tiles", "", "--acc", "", "--prec", "tf32x3",
                          "--dtype", "float32", "--rollout", "--rollout-steps", "2", "--rounds", "2"],
                         capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    assert "failed" not in out, out
    rows = out.split("nca_rollout fwd+bwd, 2 steps, 2 interleaved rounds")[1].strip().splitlines()
    names = [row.strip().split("  ")[0] for row in rows]
    assert names == ["eager", "triton", "triton TF32", "triton fwd-hchunk 32", "triton input 64,4,1,96",
                     "triton split-bwd", "triton fp32-weights", "triton gemm", "triton chunked"], out


def test_host_cost_python_part():
    """scripts/host_cost.py python: the ops' Python path with the Triton launches stubbed runs
    and reports a positive time per call for each op."""
    _needs_triton_interpreter()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "host_cost.py"), "python"],
                         capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    rows = [line for line in out.splitlines() if "of Python a call" in line]
    assert len(rows) == 3, out
    assert all(float(row.split(": ")[1].split(" ms")[0]) > 0 for row in rows), out


def test_precision_study_orders_the_modes():
    """scripts/nca_precision.py on a small state: float32 products are float32-accurate, TF32
    products lie between them and eager bfloat16, on the output and on the state gradient."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "nca_precision.py"), "--rule", "8,16,2,1",
                          "--shape", "1,12,10"], capture_output=True, text=True, timeout=300, check=True).stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert set(rows) == {"fp32", "tf32", "bf16"}, out
    # cells are "max / 2norm" triples of tokens: [max, "/", 2norm] per tensor
    two_norm = {mode: [float(t) for t in toks[2::3]] for mode, toks in rows.items()}
    for i in (0, 1):  # out, d_state
        assert two_norm["fp32"][i] < 1e-6 < two_norm["tf32"][i] < two_norm["bf16"][i], out
