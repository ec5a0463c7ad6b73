"""Benchmark helpers that do not need a GPU: the largest-size-within-a-memory-budget search, the
CUDA-graph columns of the table, and the plots of committed results."""
import dataclasses
import os

import pytest
import torch

from fastnca.benchmark.common import largest_size_within


def quadratic(bytes_per_pixel, oom_above=None):
    """A fake peak-memory measure: memory of an s x s image, out of memory past ``oom_above``."""
    def measure(s):
        if oom_above is not None and s > oom_above:
            raise torch.cuda.OutOfMemoryError("fake")
        return bytes_per_pixel * s * s
    return measure


@pytest.mark.parametrize("start", [32, 64, 256, 1024, 4096])
@pytest.mark.parametrize("bytes_per_pixel", [1.0, 100.0, 3000.0, 50_000.0])
def test_largest_size_within_budget(start, bytes_per_pixel):
    budget = 8 * 2**30
    best, probes = largest_size_within(quadratic(bytes_per_pixel), budget, start=start, multiple=32, limit=16384)
    # the largest multiple of 32 whose s^2 * bytes_per_pixel fits (or the limit)
    expected = min(16384, int((budget / bytes_per_pixel) ** 0.5) // 32 * 32)
    assert best == expected
    assert probes[best] <= budget and all(b > budget for s, b in probes.items() if s > best)
    assert len(probes) <= 2 * 10  # doubling plus bisection: logarithmic in limit / multiple


@pytest.mark.parametrize("op", ["nca_step", "neighborhood_attention"])
def test_every_suite_times_the_same_backends(monkeypatch, op):
    """One list for the op and model suites: usable backends with a kernel, no Triton on a
    CPU (even where its interpreter makes it usable), reference only in the op suites."""
    from fastnca import _backend
    from fastnca.benchmark.common import timed_backends

    cpu = torch.device("cpu")
    monkeypatch.setattr(_backend, "_usable_on", lambda b, device: True)
    assert timed_backends(cpu, op) == ["reference", "cpu", "cuda"]
    assert timed_backends(cpu, op, reference=False) == ["cpu", "cuda"]
    assert "triton" in timed_backends(torch.device("cuda"), op)
    monkeypatch.setattr(_backend, "_usable_on", lambda b, device: b in ("reference", "triton"))
    assert timed_backends(cpu, op, reference=False) == ["reference"]  # nothing else to time


def test_model_suites_take_the_impls_filter(monkeypatch):
    """fastnca bench --impls narrows the mednca and geca suites too (their baseline always
    runs); they ignored it."""
    from fastnca import _backend
    from fastnca.benchmark import common, models

    monkeypatch.setattr(_backend, "_usable_on", lambda b, device: True)
    cuda = torch.device("cuda")
    assert [i for i, _ in models._impls(cuda, "nca_step")] == ["pytorch", "fastnca:cpu", "fastnca:cuda",
                                                               "fastnca:triton"]
    monkeypatch.setattr(common, "IMPLS", ["triton"])
    for op in ("nca_step", "neighborhood_attention"):
        assert models._impls(cuda, op) == [("pytorch", None), ("fastnca:triton", "triton")]


def test_out_of_memory_does_not_fit():
    best, probes = largest_size_within(quadratic(1.0, oom_above=700), 2**40, start=256, multiple=32, limit=16384)
    assert best == 672
    assert probes[1024] is None and probes[704] is None and probes[672] == 672**2


def test_nothing_fits():
    best, probes = largest_size_within(quadratic(1e9), 2**30, start=256, multiple=32, limit=4096)
    assert best is None and min(probes) == 32


def test_rejects_start_off_grid():
    with pytest.raises(ValueError, match="multiple of 32"):
        largest_size_within(quadratic(1.0), 1.0, start=100, multiple=32, limit=1024)


def test_throughput_fractions_of_each_roof():
    from fastnca.benchmark.nca_step import _throughput

    roofs = {"matmul_float32_gflops": 100.0, "matmul_tf32_gflops": 400.0, "matmul_bfloat16_gflops": 800.0}
    # a training step is credited 3x the forward's model FLOPs, whatever the implementation does
    t = _throughput(2e9, fwd_ms=40.0, train_ms=200.0, roofs=roofs, dname="float32", fire_fraction=0.5)
    assert t["gflops_fwd"] == pytest.approx(50.0) and t["gflops_train"] == pytest.approx(30.0)
    assert t["roof_fraction_fwd"] == pytest.approx(0.5) and t["tf32_roof_fraction_train"] == pytest.approx(0.075)
    assert t["fire_fraction"] == 0.5
    b = _throughput(2e9, 40.0, 200.0, roofs, "bfloat16", 0.5)
    assert b["roof_fraction_train"] == pytest.approx(0.0375) and "tf32_roof_fraction_train" not in b
    assert set(_throughput(2e9, 40.0, 200.0, {}, "float32", 0.5)) == {"gflops_fwd", "gflops_train", "fire_fraction"}


def test_cpu_peak_counts_only_what_the_call_allocates():
    from fastnca.benchmark.common import cpu_peak_bytes

    big = torch.zeros(2**20)  # 4 MiB that exist before the call
    try:
        touched = cpu_peak_bytes(lambda: big.add_(1))
    except (ImportError, AttributeError, TypeError) as e:
        pytest.skip(f"torch profiler memory timeline unavailable or changed: {e}")
    assert touched < 2**16  # an in-place op allocates nothing (the timeline's plot said 4 MiB)

    def two_temporaries():
        a = torch.ones(2**20)
        b = a * 2
        del a
        return (b + 1).sum()

    assert 2 * 4 * 2**20 <= cpu_peak_bytes(two_temporaries) < 2 * 4 * 2**20 + 2**16


def test_json_rows_carry_their_ratios(tmp_path):
    import json

    from fastnca.benchmark.common import BASELINES, Result, write_json

    rows = [Result("nca_step", "c", "pytorch", "float32", 8.0, 12.0, 10.0, 20.0),
            Result("nca_step", "c", "fastnca:cpu", "float32", 2.0, 6.0, 1.0, None),
            Result("nca_step", "other", "fastnca:cpu", "float32", 2.0, 6.0, 1.0, 5.0)]
    path = tmp_path / "r.json"
    write_json(str(path), {}, {}, rows, {})
    got = json.loads(path.read_text())["results"]
    assert BASELINES["nca_step"] == "pytorch"
    assert got[0]["extra"]["ratios"] == {"fwd_ms": 1.0, "fwd_bwd_ms": 1.0, "saved_mb": 1.0, "peak_mb": 1.0}
    assert got[1]["extra"]["ratios"] == {"fwd_ms": 4.0, "fwd_bwd_ms": 2.0, "saved_mb": 10.0}  # peak not measured
    assert "ratios" not in got[2]["extra"]  # no baseline in its group


def test_rollout_memory_ratio_over_the_whole_footprint():
    """A rollout's peak_mb leaves out the state and the gradients every implementation holds;
    extra.peak_with_inputs_mb adds them, and its ratio is reported beside peak_mb's (at
    109ac01 on an H200 the Med-NCA rule's 33x over peak_mb was 28x over the whole footprint)."""
    from fastnca.benchmark.common import Result, baseline_ratios

    rows = [Result("nca_rollout", "c", "pytorch", "bfloat16", 1.0, 2.0, None, 18815.0,
                   extra={"peak_with_inputs_mb": 18911.0}),
            Result("nca_rollout", "c", "fastnca:triton", "bfloat16", 1.0, 2.0, None, 570.0,
                   extra={"peak_with_inputs_mb": 666.0}),
            Result("nca_rollout", "c", "fastnca:cpu", "bfloat16", 1.0, 2.0, None, 570.0)]
    q = baseline_ratios([dataclasses.asdict(r) for r in rows])
    assert q[1]["peak_mb"] == pytest.approx(33.0, abs=0.1)
    assert q[1]["peak_with_inputs_mb"] == pytest.approx(28.4, abs=0.1)
    assert "peak_with_inputs_mb" not in q[2]  # the row does not have it


def test_forward_slower_than_forward_and_backward_is_marked_suspect():
    """The forward is part of forward + backward: a row whose forward alone takes longer is
    marked in its note (H200, 109ac01: torch.compile of the depthwise rule, 221 ms a rollout
    forward against 113 ms forward + backward); NaN times (warm-only runs) are not."""
    from fastnca.benchmark.common import Result

    assert Result("nca_rollout", "c", "pytorch+compile", "bfloat16", 221.3, 112.9, note="x").note == \
        "SUSPECT: forward alone slower than forward+backward; x"
    assert Result("nca_rollout", "c", "pytorch", "bfloat16", 72.2, 172.7).note == ""
    assert Result("nca_rollout", "c", "pytorch", "bfloat16", float("nan"), float("nan")).note == ""
    assert Result("nca_rollout", "c", "pytorch", "bfloat16", 3.0).note == ""


def test_json_rows_carry_the_spread_of_their_samples(tmp_path):
    """median_ms keeps its samples: a Result records [fastest, slowest, count] per timing in
    extra.spread (a loaded machine showed a forward slower than its fwd+bwd, with nothing in
    the JSON to tell), and the progress line flags a range over 1.5x."""
    import json

    from fastnca.benchmark.common import MADE, Result, Timing, median_ms, write_json

    calls = []
    t = median_ms(lambda: calls.append(1), torch.device("cpu"), warmup=1, reps=5)
    assert isinstance(t, Timing) and len(t.samples) == 5 and len(calls) == 6
    assert min(t.samples) <= t <= max(t.samples)
    steady = Result("nca_step", "c", "pytorch", "float32", Timing.of([2.0, 2.2, 2.1]), 5.0)
    shaky = Result("nca_step", "c", "fastnca:cpu", "float32", Timing.of([1.0, 3.0, 1.1]))
    assert type(steady.fwd_ms) is float and steady.fwd_ms == 2.1 and steady.fwd_bwd_ms == 5.0
    path = tmp_path / "r.json"
    write_json(str(path), {}, {}, [steady, shaky], {})
    got = json.loads(path.read_text())["results"]
    assert got[0]["extra"]["spread"] == {"fwd_ms": [2.0, 2.2, 3]} and got[0]["fwd_ms"] == 2.1
    assert got[1]["extra"]["spread"] == {"fwd_ms": [1.0, 3.0, 3]}
    assert steady.noisy() == "" and shaky.noisy() == " (noisy: fwd_ms samples 1.00-3.00 ms)"
    MADE.clear()


def test_saved_mb_releases_the_graph():
    """Counting saved bytes must not keep the measured graph alive: relu saves its own
    output, and a pack hook returning that tensor makes a cycle the GC cannot free."""
    import weakref

    from fastnca.benchmark.common import saved_mb

    x = torch.randn(64, 64, requires_grad=True)
    kept = []

    def fwd():
        y = torch.relu(x @ x)
        kept.append(weakref.ref(y))
        return torch.relu(y @ x)

    assert saved_mb(fwd) > 0
    assert kept[0]() is None


def test_env_override_is_restored(monkeypatch):
    """The benchmarks' opt-in rows (and the variants script) set a knob only while they
    are measured; None unsets one for the block."""
    import os

    from fastnca.benchmark.common import env

    monkeypatch.setenv("FASTNCA_TRITON_NA_FORWARD", "window")
    with env(FASTNCA_TRITON_NA_FORWARD="halo"):
        assert os.environ["FASTNCA_TRITON_NA_FORWARD"] == "halo"
    assert os.environ["FASTNCA_TRITON_NA_FORWARD"] == "window"
    with env(FASTNCA_TRITON_NA_FORWARD=None):
        assert "FASTNCA_TRITON_NA_FORWARD" not in os.environ
    assert os.environ["FASTNCA_TRITON_NA_FORWARD"] == "window"
    monkeypatch.delenv("FASTNCA_TRITON_NA_FORWARD")
    with env(FASTNCA_TRITON_NA_FORWARD="halo"):
        pass
    assert "FASTNCA_TRITON_NA_FORWARD" not in os.environ


def test_graph_times_off_cuda_and_in_the_table(capsys):
    """graph_ms is CUDA-only (None elsewhere); the table shows graph replay times, or why
    a capture failed, in the row's note."""
    from fastnca.benchmark.common import Result, graph_ms, graph_times, print_table

    assert graph_ms(lambda: None, torch.device("cpu")) is None
    assert graph_times(lambda: None, lambda: None, torch.device("cpu"), 3) == {}
    rows = [Result("op", "cfg", "a", "bfloat16", 1.0, 2.0, extra={"fwd_graph_ms": 0.25, "fwd_bwd_graph_ms": 0.5}),
            Result("op", "cfg", "b", "bfloat16", 1.0, 2.0, note="n", extra={"graph_error": "RuntimeError: sync"})]
    print_table(rows, {"op": "a"})
    out = capsys.readouterr().out
    assert "graph 0.250 / 0.500 ms" in out and "graph: RuntimeError: sync; n" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", ["nca_step", "nca_rollout", "attention", "attention-halo", "attention-split"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_ops_replay_from_a_cuda_graph(monkeypatch, backend, op):
    """Each op's forward and backward captures in a CUDA graph (no host synchronisation:
    torch.compile's reduce-overhead mode and the benchmark's graph timings need it), and a
    replay gives what an eager call gives. One op per case, so a failure names the op."""
    import fastnca
    from fastnca.benchmark.common import graph_ms

    if fastnca.backends()[backend] is not True:
        pytest.skip(f"{backend}: {fastnca.backends()[backend]}")
    if op.startswith("attention-"):
        if backend != "triton":
            pytest.skip("a Triton attention forward mode")
        var, value = {"halo": ("FASTNCA_TRITON_NA_FORWARD", "halo"),
                      "split": ("FASTNCA_TRITON_NA_BACKWARD", "split")}[op.split("-")[1]]
        monkeypatch.setenv(var, value)
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).to(dev)

    rule = [r(64, 32, 3, 3), r(64), r(128, 96), r(128), r(31, 128), r(31)]
    rule = [t.requires_grad_(True) for t in rule]
    x = r(2, 32, 64, 64).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    qkv = r(2, 16, 16, 3, 4, 32).to(torch.bfloat16).requires_grad_(True)
    outs = {}

    def step():
        if op == "nca_step":
            y = fastnca.nca_step(x, *rule, seed=3, step=5, frozen_channels=1, backend=backend)
            leaves = [x, *rule]
        elif op == "nca_rollout":
            y = fastnca.nca_rollout(x, *rule, steps=5, seed=3, frozen_channels=1, backend=backend)
            leaves = [x, *rule]
        else:
            q, k, v = qkv.unbind(3)
            y = fastnca.neighborhood_attention2d(q, k, v, backend=backend)
            leaves = [qkv]
        # detached: an output kept with its graph keeps the leaves' AccumulateGrad nodes,
        # made in the eager call on the legacy default stream, into the captured backward
        outs["last"] = (y.detach(), *torch.autograd.grad(y.float().square().sum(), leaves))

    step()
    eager = [t.clone() for t in outs["last"]]
    assert graph_ms(step, dev, reps=3) > 0
    for a, b in zip(outs["last"], eager):  # the tensors the last replay wrote
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_failed_capture_leaves_the_generator_usable():
    """A capture that fails (here a host synchronisation) is reported in graph_error, and
    the default CUDA generator still draws after it (torch leaves it in capture mode)."""
    from fastnca.benchmark.common import graph_times

    dev = torch.device("cuda")
    t = torch.ones(4, device=dev)
    got = graph_times(lambda: t.sum().item(), None, dev, 3)
    assert "graph_error" in got, got
    assert torch.randn(8, device=dev).isfinite().all()
    assert torch.rand(8, device=dev).lt(1).all()


RESULTS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")


def test_plot_groups_and_speedups():
    from fastnca.benchmark import plot
    from fastnca.benchmark.common import baseline_ratios

    rows = [dict(op="nca_step", config="c", dtype="float32", impl="fastnca:cpu", fwd_ms=2.0, fwd_bwd_ms=None),
            dict(op="nca_step", config="c", dtype="float32", impl="pytorch", fwd_ms=8.0, fwd_bwd_ms=12.0),
            dict(op="nca_step", config="d", dtype="float32", impl="pytorch", fwd_ms=None, fwd_bwd_ms=None),
            dict(op="nca_rollout_peak", config="c", dtype="float32", impl="pytorch", peak_mb=5.0)]
    found = plot.groups(rows)
    assert [key for key, _ in found] == [("nca_step", "c", "float32"), ("nca_rollout_peak", "c", "float32")]
    assert [r["impl"] for r in found[0][1]] == ["fastnca:cpu", "pytorch"]  # file order kept
    ratios = baseline_ratios(found[0][1])  # the plot's labels (one function for table, JSON and plot)
    assert [q.get("fwd_ms") for q in ratios] == [4.0, 1.0]
    assert [q.get("fwd_bwd_ms") for q in ratios] == [None, 1.0]  # not measured: no ratio
    assert baseline_ratios([dict(r, op="neighborhood_attention") for r in found[0][1]]) == [{}, {}]  # no baseline row


@pytest.mark.parametrize("name", ["cpu-amd-epyc-2threads-2026-11-26.json", "h200-220af96-attention-nca-bf16-partial.json"])
def test_fastnca_plot_draws_committed_results(tmp_path, name):
    pytest.importorskip("matplotlib")
    from fastnca import cli

    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        pytest.skip(f"{name} not in this checkout")
    assert cli.main(["plot", path, "--out", str(tmp_path)]) == 0
    png = tmp_path / name.replace(".json", ".png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 30_000  # a figure with its panels, not an empty canvas


def test_fastnca_plot_rejects_a_file_without_results(tmp_path):
    pytest.importorskip("matplotlib")
    from fastnca.benchmark import plot

    empty = tmp_path / "empty.json"
    empty.write_text('{"results": []}')
    with pytest.raises(ValueError, match="no results"):
        plot.plot_file(str(empty), str(tmp_path))


# ---------------------------------------------------------------------------------------
# The figures the results publish: counts, roofs, medians, peaks, baselines, provenance
# ---------------------------------------------------------------------------------------

def test_flop_and_byte_counts():
    """The work each suite credits: FLOPs a cell of the Med-NCA and depthwise rules (conv to
    F*C channels, fc1 over (F+1)*C inputs, fc2 to the C - frozen updated channels) and the
    bytes an attention call moves at least (q, k, v, o; the float32 lse)."""
    from fastnca.benchmark.nca_step import flops_per_cell
    from fastnca.benchmark.neighborhood_attention import attention_bytes

    assert flops_per_cell(32, 128, 2, 1, 1) == 2 * (9 * 32 * 64 + 96 * 128 + 128 * 31) == 69376
    assert flops_per_cell(16, 128, 2, 16, 1) == 2 * (9 * 1 * 32 + 48 * 128 + 128 * 15) == 16704
    n, queries = 4 * 32 * 32 * 6 * 64, 4 * 32 * 32 * 6
    assert attention_bytes(4, 32, 32, 6, 64, 2) == (4 * n * 2 + 4 * queries, 8 * n * 2 + 4 * queries)


def test_roofs_count_both_directions_and_both_flops(monkeypatch):
    """A copy moves its bytes twice (read and write); an n x n matmul does 2 n^3 FLOPs."""
    from fastnca.benchmark import common

    monkeypatch.setattr(common, "median_ms", lambda fn, device, **kw: 1.0)
    cpu = torch.device("cpu")
    assert common.copy_bandwidth_gbs(cpu) == pytest.approx(2 * (1 << 25) * 4 / 1e-3 / 1e9)
    assert common.matmul_roof_gflops(cpu, torch.float32, n=64) == pytest.approx(2 * 64**3 / 1e-3 / 1e9)
    # a roof is the fastest sample, not the median (a shared machine's slow samples)
    monkeypatch.setattr(common, "median_ms", lambda fn, device, **kw: common.Timing.of([3.0, 1.0, 2.0]))
    assert common.matmul_roof_gflops(cpu, torch.float32, n=64) == pytest.approx(2 * 64**3 / 1e-3 / 1e9)


def test_medians_and_saved_storages():
    """A timing is the median of its samples (not their mean), and saved bytes count each
    storage once, however many views of it autograd keeps (q, k, v of one packed qkv)."""
    from fastnca.benchmark.common import Timing, saved_mb

    assert Timing.of([1.0, 3.0, 1.1]) == 1.1
    x = torch.randn(3, 1000, requires_grad=True)
    a, b, c = x.unbind(0)
    assert saved_mb(lambda: (a * b).sum() + (b * c).sum()) == x.nbytes / 2**20


def test_ratios_are_taken_within_a_dtype(tmp_path):
    """Rows of two dtypes in one config each take their own dtype's baseline."""
    from fastnca.benchmark.common import Result, baseline_ratios

    rows = [Result("nca_step", "c", "pytorch", "bfloat16", 4.0), Result("nca_step", "c", "fastnca:cpu", "bfloat16", 1.0),
            Result("nca_step", "c", "pytorch", "float32", 8.0), Result("nca_step", "c", "fastnca:cpu", "float32", 2.0)]
    got = [r.get("fwd_ms") for r in baseline_ratios([dataclasses.asdict(r) for r in rows])]
    assert got == [1.0, 4.0, 1.0, 4.0]


def test_cuda_peak_leaves_out_what_existed_before(monkeypatch):
    """On CUDA the peak is the allocator's maximum during the call less what was allocated
    before it (counters faked: 100 MiB before, 130 MiB at the peak)."""
    from fastnca.benchmark import common

    mib = 2**20
    calls = []
    for name, fn in (("empty_cache", lambda: None), ("memory_allocated", lambda d=None: 100 * mib),
                     ("reset_peak_memory_stats", lambda d=None: calls.append("reset")),
                     ("max_memory_allocated", lambda d=None: 130 * mib)):
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(common, "sync", lambda device: None)
    assert common.peak_mb(lambda: calls.append("call"), torch.device("cuda")) == 30.0
    assert calls == ["reset", "call"]


def test_environment_names_the_commit(monkeypatch):
    """The JSON's git_commit: FASTNCA_GIT_COMMIT where set (a copied tree without .git),
    else the checkout's HEAD."""
    import subprocess

    from fastnca.benchmark.common import environment

    monkeypatch.setenv("FASTNCA_GIT_COMMIT", "abc123")
    env = environment(torch.device("cpu"))
    assert (env["git_commit"], env["git_dirty"]) == ("abc123", None)
    monkeypatch.setenv("FASTNCA_GIT_DIRTY", "1")
    assert environment(torch.device("cpu"))["git_dirty"] is True
    monkeypatch.delenv("FASTNCA_GIT_COMMIT")
    monkeypatch.delenv("FASTNCA_GIT_DIRTY")
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    if not head:
        pytest.skip("not a git checkout")
    assert environment(torch.device("cpu"))["git_commit"] == head


def test_git_commit_only_of_a_fastnca_checkout(tmp_path):
    """An installed fastnca inside another git repository (a project's .venv) records no
    commit, not that repository's HEAD; a checkout's python/fastnca records its own."""
    import subprocess

    from fastnca.benchmark.common import git_commit, git_dirty

    def git(*args, cwd=tmp_path):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        git("init", "-q")
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git not usable here")
    site = tmp_path / ".venv" / "lib" / "site-packages" / "fastnca"
    checkout = tmp_path / "python" / "fastnca"
    for d in (site, checkout):
        d.mkdir(parents=True)
        (d / "__init__.py").write_text("")
    git("add", "-A")
    git("commit", "-q", "-m", "x")
    assert git_commit(str(site)) is None
    assert git_commit(str(checkout)) == git("rev-parse", "HEAD")
    assert git_commit(str(tmp_path / "nowhere")) is None
    # git_dirty: whether that HEAD is exactly the code measured
    assert (git_dirty(str(checkout)), git_dirty(str(site))) == (False, None)
    (checkout / "__init__.py").write_text("x = 1\n")
    assert git_dirty(str(checkout)) is True


def _stub_measures(monkeypatch, module, ms=1.0, peak=10.0):
    from fastnca.benchmark import common
    from fastnca.benchmark.common import Timing

    monkeypatch.setattr(module, "median_ms", lambda fn, device, **kw: Timing.of([ms]))
    monkeypatch.setattr(module, "peak_mb", lambda fn, device, cpu=False: peak)
    monkeypatch.setattr(module, "saved_mb", lambda fn: 0.0)
    monkeypatch.setattr(common, "MADE", [])


def test_nca_suite_credits_each_row_its_own_work(monkeypatch):
    """The CPU nca suite (not --quick: rollouts at half the steps' resolution), timings
    stubbed at 1 ms and 10 MB: each row's GFLOP/s is its own cells x steps x FLOPs a cell,
    and a rollout's peak_with_inputs_mb adds its state, state gradient and output gradient."""
    from fastnca.benchmark import common
    from fastnca.benchmark import nca_step as suite

    _stub_measures(monkeypatch, suite)
    monkeypatch.setattr(common, "IMPLS", ["fastnca:cpu"])
    rows = suite.run(torch.device("cpu"), torch.float32, False, {"matmul_float32_gflops": 1000.0}, log=lambda *a: None)
    seen = set()
    for r in rows:
        assert not r.note, r.note
        C, fpc = (32, 69376) if r.config.startswith("mednca") else (16, 16704)
        cells, steps = (256 * 256, 1) if r.op == "nca_step" else (128 * 128, 64)
        assert r.extra["gflops_fwd"] == pytest.approx(cells * steps * fpc / 1e-3 / 1e9), (r.op, r.config)
        assert r.extra["roof_fraction_fwd"] == pytest.approx(r.extra["gflops_fwd"] / 1000.0)
        if r.op == "nca_rollout":
            assert r.extra["peak_with_inputs_mb"] == pytest.approx(10.0 + 3 * C * 128 * 128 * 4 / 2**20)
        seen.add((r.op, r.config.split()[0], r.impl))
    assert {(op, cfg) for op, cfg, _ in seen} == {(op, cfg) for op in ("nca_step", "nca_rollout")
                                                   for cfg in ("mednca", "ncalab-depthwise")}


def test_attention_suite_credits_its_bytes(monkeypatch):
    """The attention suite (--quick shape, timings stubbed at 1 ms): GB/s and the fraction
    of the copy roof from attention_bytes."""
    from fastnca.benchmark import common
    from fastnca.benchmark import neighborhood_attention as suite

    _stub_measures(monkeypatch, suite)
    monkeypatch.setattr(common, "IMPLS", ["fastnca:cpu"])
    rows = suite.run(torch.device("cpu"), torch.float32, True, {"copy_gbs": 100.0}, log=lambda *a: None)
    fwd, bwd = suite.attention_bytes(4, 32, 32, 6, 64, 4)
    assert {r.impl for r in rows} == {"unfold (GeCA)", "fastnca:cpu"}
    for r in rows:
        assert r.extra["gbs_fwd"] == pytest.approx(fwd / 1e-3 / 1e9)
        assert r.extra["gbs_fwd_bwd"] == pytest.approx((fwd + bwd) / 1e-3 / 1e9)
        assert r.extra["bw_fraction_fwd"] == pytest.approx(r.extra["gbs_fwd"] / 100.0)


def test_full_resolution_peak_under_warm_only(monkeypatch):
    """--warm-only runs no 1024x1024 peak rows (peak_mb returns None there: the warm-up of
    the H200 run at 109ac01 failed on None + float in each row) and allocates nothing for
    them; a timed run does measure them."""
    from fastnca.benchmark import common, nca_step

    calls = []
    monkeypatch.setattr(nca_step, "peak_mb", lambda fn, device: calls.append(fn) or 100.0)
    monkeypatch.setattr(torch, "randn", lambda *a, **k: calls.append("alloc") or torch.zeros(1, 2, 3, 3))
    args = ((torch.zeros(1),), 2, {}, 64, "mednca B=8 256x256", "float32", ["reference"], torch.device("cpu"),
            lambda msg: None)
    monkeypatch.setattr(common, "WARM_ONLY", True)
    assert nca_step._full_resolution_peak(None, *args) == [] and calls == []
    monkeypatch.setattr(common, "WARM_ONLY", False)
    rows = nca_step._full_resolution_peak(None, *args)
    assert [r.impl for r in rows] == ["pytorch", "fastnca:reference"] and all(r.peak_mb > 100 for r in rows)


def test_variant_rows_only_with_variants(monkeypatch):
    """The opt-in formulations' rows (fastnca bench --variants) on a GPU: the hidden-chunk
    modes first (the forward's, then the backward's), the older bfloat16 defaults for
    bfloat16 only, none by default (a user's run times what ships; the seventh GPU run's nca
    suite did not finish in 120 s with them). The CLI hands --variants to the suites for
    that run only."""
    from fastnca.benchmark import common, nca_step
    from fastnca.cli import main

    from fastnca.benchmark import neighborhood_attention

    assert nca_step.triton_rows(torch.bfloat16, False) == [("fastnca:triton tf32", "triton", "tf32")]
    assert nca_step.triton_rows(torch.bfloat16, True)[1:] == nca_step.variant_rows(torch.bfloat16)
    assert list(neighborhood_attention.triton_knobs(False)) == ["fastnca:triton"]
    knobs = neighborhood_attention.triton_knobs(True)
    assert list(knobs) == ["fastnca:triton", "fastnca:triton halo", "fastnca:triton halo 4x8", "fastnca:triton split"]
    assert all(set(k) == set(knobs["fastnca:triton"]) for k in knobs.values())  # every knob pinned in each row
    bf16 = [name for name, _, _ in nca_step.variant_rows(torch.bfloat16)]
    fp32 = [name for name, _, _ in nca_step.variant_rows(torch.float32)]
    assert bf16[:3] == fp32[:3] == ["fastnca:triton fwd-hchunk", "fastnca:triton chunked", "fastnca:triton gemm"]
    assert "fastnca:triton fp32-weights" in bf16 and not any("fp32-" in n for n in fp32)
    assert all(mode for _, _, mode in nca_step.variant_rows(torch.bfloat16))
    seen = []
    monkeypatch.setattr(common, "matmul_roof_gflops", lambda device, dtype, n=None, tf32=False: 1.0)
    monkeypatch.setattr(common, "copy_bandwidth_gbs", lambda device: 1.0)
    monkeypatch.setattr(nca_step, "run", lambda device, dtype, quick, roofs, log=print: seen.append(common.VARIANTS)
                        or [])
    for flags in ([], ["--variants"], []):
        assert main(["bench", "--device", "cpu", "--quick", "--ops", "nca", *flags]) == 0
    assert seen == [False, True, False] and common.VARIANTS is False
