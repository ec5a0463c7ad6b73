"""Timing, memory measurement, roofs and the result table shared by the benchmarks."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


@dataclasses.dataclass
class Result:
    op: str
    config: str
    impl: str  # "fastnca:<backend>" or a baseline name
    dtype: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    saved_mb: float | None = None  # bytes autograd keeps for backward
    peak_mb: float | None = None  # peak memory allocated during fwd+bwd
    note: str = ""
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        spread = {}
        for name in ("fwd_ms", "fwd_bwd_ms"):  # Timings: their samples' range, then plain floats
            t = getattr(self, name)
            if isinstance(t, Timing):
                if t.samples:
                    spread[name] = t.spread()
                setattr(self, name, float(t))
        if spread:
            self.extra = {**self.extra, "spread": spread}
        f, fb = self.fwd_ms, self.fwd_bwd_ms
        if f is not None and fb is not None and f > fb:  # NaN (warm-only runs) compares False
            # the forward is part of forward + backward: a row where it alone takes longer
            # measured something else (H200, 109ac01: the depthwise rule's compiled forward)
            self.note = "; ".join(filter(None, ("SUSPECT: forward alone slower than forward+backward", self.note)))
        MADE.append(self)

    def noisy(self, factor: float = 1.5) -> str:
        """' (noisy: ...)' where a timing's slowest sample is over ``factor`` x its fastest."""
        bad = [f"{name} samples {fmt(lo)}-{fmt(hi)} ms" for name, (lo, hi, _) in self.extra.get("spread", {}).items()
               if lo > 0 and hi > factor * lo]
        return f" (noisy: {'; '.join(bad)})" if bad else ""


class Timing(float):
    """A median time (ms) that keeps the samples it is the median of: a Result built from it
    records their range in extra["spread"]."""

    samples: tuple = ()

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        t = cls(statistics.median(samples))
        t.samples = tuple(samples)
        return t

    def spread(self) -> list:
        """[fastest, slowest, count] of the samples."""
        return [round(min(self.samples), 5), round(max(self.samples), 5), len(self.samples)]


# Every Result made in this process, in order: what a run stopped part-way (SIGTERM from a
# time limit) still writes out.
MADE: list[Result] = []


def timed_backends(device: torch.device, op: str, reference: bool = True) -> list[str]:
    """The fastnca backends a suite times for ``op`` on ``device``: those usable there with a
    kernel for it, without Triton on a CPU (its interpreter is not a benchmark), and without
    ``reference`` unless asked (then ["reference"] where no other is left)."""
    from fastnca import _backend

    names = [b for b in ("reference", "cpu", "cuda", "triton")
             if (reference or b != "reference") and not (b == "triton" and device.type == "cpu")
             and _backend._usable_on(b, device) is True and _backend.has_kernel(b, op)]
    return names or ["reference"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ``fastnca bench --warm-only``: run every measured callable once and time nothing, to fill
# the on-disk compile caches (Triton kernels, Inductor graphs) ahead of a timed run.
WARM_ONLY = False

# ``fastnca bench --variants``: also time the opt-in Triton formulations and the older
# defaults (rows for choosing defaults, GPU only).
VARIANTS = False

# ``fastnca bench --impls A,B``: run only the implementations whose names contain one of
# these substrings (each suite's baseline always runs: the ratios are against it).
IMPLS: list | None = None


def selected(rows: list) -> list:
    """rows (each suite's implementations as tuples led by their names, its baseline first)
    narrowed to IMPLS."""
    if not IMPLS:
        return rows
    return rows[:1] + [r for r in rows[1:] if any(part in r[0] for part in IMPLS)]


# On a GPU, calls shorter than this are timed in back-to-back batches (CUDA events around
# the batch): the launches of one call overlap the kernels of the previous one, as in a
# training loop, instead of every call paying a host round trip.
BATCH_MS = 10.0


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, reps: int = 7,
              max_seconds: float = 20.0) -> Timing:
    """Median time per call of ``fn`` in ms; stops early past max_seconds. CPU: wall time of
    each call. CUDA: each sample times a batch of back-to-back calls (as many as fill
    BATCH_MS, at least one) with CUDA events, and divides by the batch size."""
    if WARM_ONLY:
        fn()
        sync(device)
        return float("nan")
    for _ in range(warmup):
        fn()
    sync(device)
    inner = batch_size(fn, device)
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        times.append(batch_ms(fn, device, inner))
        if time.perf_counter() - start > max_seconds and len(times) >= 3:
            break
    return Timing.of(times)


def batch_size(fn: Callable[[], object], device: torch.device) -> int:
    """Calls of ``fn`` (already warm) per timed batch: as many as fill BATCH_MS on CUDA, from
    one host-synchronised call; one on the CPU."""
    if device.type != "cuda":
        return 1
    t0 = time.perf_counter()
    fn()
    sync(device)
    one_ms = (time.perf_counter() - t0) * 1e3
    return max(1, min(100, int(BATCH_MS / max(one_ms, 1e-3))))


def batch_ms(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    """ms per call of ``fn``: on CUDA, CUDA-event time of ``inner`` back-to-back calls divided
    by ``inner``; on the CPU, the wall time of one call."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / inner


def graph_ms(fn: Callable[[], object], device: torch.device, *, reps: int = 7) -> float | None:
    """Median ms per call of ``fn`` replayed from one CUDA graph (captured after a warm-up on
    a side stream, as torch's CUDA-graph recipe does): the GPU time of its kernels without
    the host's per-launch cost, which bounds eager calls of sub-millisecond ops. None off
    CUDA; raises what capture raises (an op that synchronises with the host cannot be
    captured), with the caller's stream current again and the CUDA generator usable.
    ``fn`` must make the autograd nodes its backward reaches: a node made before, on the
    legacy default stream (a view of a leaf taken once outside, an output kept with its
    graph), records that stream, and the engine's wait of it on the capturing stream fails
    the capture ("operation would make the legacy stream depend on a capturing blocking
    stream", torch 2.11)."""
    if device.type != "cuda":
        return None
    if WARM_ONLY:
        fn()
        sync(device)
        return float("nan")
    stream = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:
        # torch.cuda.graph leaves its capture stream current when capture_end raises: every
        # later op of the process would run on it (2026-11-26, H200, torch 2.11: ops then
        # recorded that stream in their autograd nodes, and the next configuration's
        # captures passed, which hid the cause)
        torch.cuda.set_stream(stream)
        _end_generator_capture(device)
        raise
    try:
        return median_ms(graph.replay, device, reps=reps)
    finally:
        del graph
        sync(device)
        torch.cuda.empty_cache()


def _end_generator_capture(device: torch.device) -> None:
    """After a capture that failed (an invalidated stream capture raises in capture_end
    before torch ends the default CUDA generator's capture), the generator still counts
    itself as capturing and every later draw from it raises "Offset increment outside graph
    capture encountered unexpectedly" (torch 2.11, H200, 2026-11-26: it ended a benchmark
    run at the next torch.randn). A capture that succeeds ends it."""
    sync(device)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        scratch = torch.zeros(1, device=device)
        with torch.cuda.graph(graph, stream=side):
            scratch.add_(1)
    del graph, scratch
    sync(device)


def graph_times(fwd: Callable[[], object], fwd_bwd: Callable[[], object] | None, device: torch.device,
                reps: int) -> dict:
    """A result's graph-replay fields (graph_ms of the forward and of forward + backward), or
    graph_error with why a capture failed; {} off CUDA."""
    if device.type != "cuda":
        return {}
    try:
        return {"fwd_graph_ms": graph_ms(fwd, device, reps=reps),
                "fwd_bwd_graph_ms": graph_ms(fwd_bwd, device, reps=reps) if fwd_bwd else None}
    except Exception as e:  # noqa: BLE001 -- an implementation that cannot be captured
        return {"graph_error": f"{type(e).__name__}: {e}"[:120]}


def tuned_now() -> dict[str, str]:
    """What fastnca's autotuned Triton kernels picked so far in this process (tuned_configs),
    {} without Triton."""
    try:
        from fastnca.kernels.triton._runtime import tuned_configs
    except ImportError:
        return {}
    return tuned_configs()


def tuned_since(before: dict[str, str]) -> dict:
    """{"tuned": {"kernel[key]": config}} of the picks made since tuned_now() gave ``before``
    (a row's own tuning), or {} when none."""
    new = {k: v for k, v in tuned_now().items() if k not in before}
    return {"tuned": new} if new else {}


def saved_mb(fn: Callable[[], object]) -> float:
    """MB of distinct storages autograd saves for backward while ``fn`` runs."""
    if WARM_ONLY:
        return float("nan")
    seen: dict = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[(st.data_ptr(), t.device)] = st.nbytes()
            # Detached: an op that saves its own output (relu does) would otherwise hold that
            # output through its grad_fn, a cycle Python's GC cannot see: the whole graph (37 GB
            # for a 64-step fp32 rollout on a GPU) would leak into the next measurement.
            return t.detach()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values()) / 2**20


def release(device: torch.device) -> None:
    """Between implementations: free what the last one left (cycles, cached blocks), so one
    implementation's memory never becomes the next one's out-of-memory error."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_mb(fn: Callable[[], object], device: torch.device, cpu: bool = False) -> float | None:
    """Peak memory allocated while ``fn`` runs, in MB above what was allocated before: on
    CUDA from the caching allocator's statistics; on the CPU (only when ``cpu``: it runs
    under the profiler) from the profiler's memory timeline, None where this torch lacks it."""
    if WARM_ONLY:
        return None
    if device.type == "cpu" and cpu:
        return _cpu_peak_mb(fn)
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


@contextlib.contextmanager
def env(**values: str | None):
    """Environment variables set to a value (or unset, for None) inside the block and
    restored after it: the kernels' benchmarking knobs, read at each call."""
    def put(settings):
        for name, value in settings.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    old = {name: os.environ.get(name) for name in values}
    try:
        put(values)
        yield
    finally:
        put(old)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the CPU bytes allocated while ``fn`` runs above what was allocated before (as
    the CUDA measure: tensors that existed before count only when freed), from
    torch.profiler's memory timeline: a private API (torch >= 2.1), so this raises
    ImportError / AttributeError / TypeError where a torch lacks or changed it. The
    timeline's own plot also counts the tensors that existed before and were touched."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, (key, _version), size in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def _cpu_peak_mb(fn: Callable[[], object]) -> float | None:
    try:
        return cpu_peak_bytes(fn) / 2**20
    except (ImportError, AttributeError, TypeError, ValueError, RuntimeError):
        return None


def largest_size_within(measure: Callable[[int], float], budget: float, *, start: int, multiple: int,
                        limit: int) -> tuple[int | None, dict[int, float | None]]:
    """Largest size ``s`` (a multiple of ``multiple``, at most ``limit``) with
    ``measure(s) <= budget``, for a ``measure`` that grows with ``s`` (peak bytes of a
    training step, say). Doubles from ``start`` until a size does not fit, then bisects.
    A ``measure`` raising ``torch.cuda.OutOfMemoryError`` does not fit.

    Returns (that size or None when none fits, {probed size: measure, None for out of memory}).
    """
    if start % multiple or not multiple <= start <= limit:
        raise ValueError(f"start must be a multiple of {multiple} in [{multiple}, {limit}], got {start}")
    probes: dict[int, float | None] = {}

    def fits(s):
        try:
            probes[s] = measure(s)
        except torch.cuda.OutOfMemoryError:
            probes[s] = None
        return probes[s] is not None and probes[s] <= budget

    top = limit // multiple * multiple
    lo, hi, s = 0, top + multiple, start  # lo fits (0: none yet), hi does not or is past the limit
    while True:
        if not fits(s):
            hi = s
            break
        lo = s
        if s == top:
            break
        s = min(2 * s, top)
    while hi - lo > multiple:
        mid = lo + (hi - lo) // multiple // 2 * multiple
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo or None, probes


def matmul_roof_gflops(device: torch.device, dtype: torch.dtype, n: int | None = None,
                       tf32: bool = False) -> float:
    """Achieved GFLOP/s of a large square matmul: the compute roof the NCA kernels are held to.
    ``tf32`` (CUDA, float32): one TF32 tensor-core product per product (allow_tf32), the
    roof of the Triton kernels' single-TF32 mode; their default 3xTF32 does three TF32
    products per product, so at most about a third of it."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        ms = _fastest(median_ms(lambda: a @ b, device, warmup=2, reps=7))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    return 2 * n**3 / (ms * 1e-3) / 1e9


def _fastest(t: float) -> float:
    """A roof's time: the fastest sample, what the machine can do (the median of 5 on a shared
    2-core machine once read 125 GFLOP/s where other runs read 204-214); a plain float as is."""
    return min(t.samples) if isinstance(t, Timing) and t.samples else float(t)


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Achieved GB/s (read + write) of a large device copy: the roof for memory-bound ops."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    ms = _fastest(median_ms(lambda: b.copy_(a), device, warmup=2, reps=7))
    return 2 * a.nbytes / (ms * 1e-3) / 1e9


def git_commit(package_dir: str) -> str | None:
    """HEAD of the fastnca checkout whose package folder (python/fastnca) is ``package_dir``,
    or None: an installed fastnca lies in site-packages, often inside the user's own git
    repository (a project's .venv), whose commit would be the wrong one to record."""
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package_dir, capture_output=True,
                             text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    if len(out) != 2:
        return None
    top, head = out
    ours = os.path.join(top, "python", "fastnca")
    return head if os.path.isdir(ours) and os.path.samefile(ours, package_dir) else None


def git_dirty(package_dir: str) -> bool | None:
    """Whether the fastnca checkout of ``package_dir`` (as git_commit) has uncommitted changes
    to tracked files, so that its HEAD is not exactly the code measured; None where
    git_commit finds no checkout."""
    if git_commit(package_dir) is None:
        return None
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=package_dir,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    # A copy of the tree without .git (a remote GPU machine) names its commit in FASTNCA_GIT_COMMIT.
    # git_dirty: uncommitted changes to tracked files (FASTNCA_GIT_DIRTY=0/1 with such a copy;
    # unknown, None, when only the commit is given).
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["git_commit"] = os.environ.get("FASTNCA_GIT_COMMIT")
    if env["git_commit"]:
        dirty = os.environ.get("FASTNCA_GIT_DIRTY")
        env["git_dirty"] = None if dirty is None else dirty == "1"
    else:
        env["git_commit"], env["git_dirty"] = git_commit(package), git_dirty(package)
    try:
        from .. import __version__

        env["fastnca"] = __version__
    except ImportError:
        pass
    # The eager and compiled PyTorch baselines run at torch's defaults: on CUDA, float32
    # convolutions as TF32 (cudnn) and float32 matmuls as float32, unless the user changed them.
    env["allow_tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        env["device"] = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return env


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


# Each suite's baseline, the implementation ratios are taken against: the papers' code.
# (mednca_max_size has none: its rows' peaks are taken at different image sizes.)
BASELINES = {"nca_step": "pytorch", "nca_rollout": "pytorch", "nca_rollout_peak": "pytorch",
             "neighborhood_attention": "unfold (GeCA)", "mednca_train": "pytorch",
             "geca_train": "pytorch", "geca_sample": "pytorch"}


RATIO_FIELDS = ("fwd_ms", "fwd_bwd_ms", "saved_mb", "peak_mb")


def baseline_ratios(rows: list[dict], baselines: dict[str, str] = BASELINES) -> list[dict[str, float]]:
    """Per row (a dict of Result's fields, as in the JSON files), baseline / row for each of
    RATIO_FIELDS that both measured, against the baseline row of its (op, config, dtype):
    the table's x columns, the JSON's extra.ratios and the plots' labels."""
    base = {(r["op"], r["config"], r.get("dtype")): r for r in rows if r["impl"] == baselines.get(r["op"])}
    out = []
    for r in rows:
        b = base.get((r["op"], r["config"], r.get("dtype")), {})
        q = {f: b[f] / r[f] for f in RATIO_FIELDS if b.get(f) and r.get(f)}
        bx, rx = b.get("extra") or {}, r.get("extra") or {}
        if bx.get("peak_with_inputs_mb") and rx.get("peak_with_inputs_mb"):  # the whole footprint
            q["peak_with_inputs_mb"] = bx["peak_with_inputs_mb"] / rx["peak_with_inputs_mb"]
        out.append(q)
    return out


def print_table(results: list[Result], baselines: dict[str, str] = BASELINES) -> None:
    """One table per (op, config, dtype): every implementation with ratios vs the baseline."""
    groups: dict[tuple, list[tuple[Result, dict]]] = {}
    for r, q in zip(results, baseline_ratios([dataclasses.asdict(r) for r in results], baselines)):
        groups.setdefault((r.op, r.config, r.dtype), []).append((r, q))
    header = f"{'impl':<24}{'fwd ms':>10}{'fwd+bwd ms':>12}{'saved MB':>10}{'peak MB':>10}{'x fwd':>8}{'x f+b':>8}{'x saved':>9}  note"
    for key, rows in groups.items():
        print(f"\n== {key[0]} | {key[1]} | {key[2]}")
        print(header)
        for r, q in rows:
            def ratio(attr):
                return f"{q[attr]:.2f}" if attr in q else "-"
            note = r.note
            if r.extra.get("fwd_graph_ms") is not None:  # CUDA-graph replay: the kernels alone
                note = (f"graph {fmt(r.extra['fwd_graph_ms'], 3)} / {fmt(r.extra.get('fwd_bwd_graph_ms'), 3)} ms"
                        + (f"; {note}" if note else ""))
            elif r.extra.get("graph_error"):
                note = f"graph: {r.extra['graph_error'][:40]}" + (f"; {note}" if note else "")
            print(f"{r.impl:<24}{fmt(r.fwd_ms):>10}{fmt(r.fwd_bwd_ms):>12}{fmt(r.saved_mb):>10}"
                  f"{fmt(r.peak_mb):>10}{ratio('fwd_ms'):>8}{ratio('fwd_bwd_ms'):>8}{ratio('saved_mb'):>9}  {note}")
    print("\nx = baseline / fastnca (higher is better: speed-up, or times less memory)")


# What the fields of a result mean, written into every JSON file next to the numbers.
DEFINITIONS = {
    "fwd_ms, fwd_bwd_ms": "median time per call of the forward, and of forward + backward (ms); "
                          "CPU: wall time of each call; CUDA: CUDA-event time of back-to-back "
                          "batches of calls filling ~10 ms, divided by the batch size. Attention "
                          "fwd+bwd: torch.autograd.grad of the output to the q, k, v views of one "
                          "packed qkv tensor (the op alone: autograd neither stacks the three "
                          "gradients into the packed one nor accumulates qkv.grad; until commit "
                          "73b363e it did both, ~0.34 ms of GeCA-S bf16's 1.41 ms on an H100, for "
                          "every implementation alike)",
    "spread": "extra.spread: {\"fwd_ms\": [fastest, slowest, count], \"fwd_bwd_ms\": [...]}, the "
              "samples behind those medians (ms per call; CUDA-graph times have none); a wide "
              "range marks a noisy measurement (shared machine, clocks)",
    "saved_mb": "bytes autograd keeps for backward (saved-tensor hooks), MB",
    "extra.peak_with_inputs_mb": "nca_rollout: peak_mb plus the state, its gradient and the output gradient, "
                                 "which every implementation holds (memory ratios over the whole footprint)",
    "environment.allow_tf32": "torch's TF32 switches during the run: the PyTorch baselines run at them "
                              "(on CUDA by default float32 convolutions in TF32, matmuls in float32)",
    "peak_mb": "peak memory allocated during one forward + backward, above what was allocated "
               "before (the inputs and their gradient buffers not counted), MB: CUDA "
               "torch.cuda.max_memory_allocated; CPU (nca rows) the peak of torch.profiler's memory "
               "timeline; nca_rollout_peak adds the state and its output gradient "
               "(extra.includes_state_and_grad_mb); mednca_max_size counts everything one training "
               "step makes, at the largest size that fits",
    "gflops_fwd, gflops_train": "nca: model GFLOP/s, the same count for every implementation "
                                "(benchmark.nca_step.flops_per_cell: the conv, fc1 and fc2 to the "
                                "C - frozen updated channels; 69376 a cell for the Med-NCA rule, "
                                "69632 in results up to 2026-11-27 (ab815b9 included), which counted fc2 to all C): "
                                "every cell (the fused kernels skip cells that do not fire, so "
                                "this can exceed the matmul roof; fire_fraction is the measured "
                                "share of firing cells), and a training step 3x the forward "
                                "(forward and two backward products; a recomputing backward "
                                "does ~4x)",
    "fire_fraction": "nca: the share of cells that fire in the timed step (rollouts: averaged "
                     "over the steps)",
    "roof_fraction_*": "that GFLOP/s over the measured matmul roof of the same dtype (roofs: "
                       "the fastest of 7 samples from 2026-11-29, the median of 5 before)",
    "tf32_roof_fraction_*": "float32 on CUDA: over the single-TF32 tensor-core matmul roof (the default 3xTF32 "
                            "products reach at most about 1/3 of it; float32 roof_fraction_* is over the "
                            "non-tensor-core float32 matmul)",
    "extra.tuned": "Triton rows on a GPU: the config each autotuned fastnca kernel picked while "
                   "the row was measured, \"kernel[tuning key]\": \"config\" (attention keys open "
                   "with H, W, heads, D; the nca forward's with C, F, hidden); a key an earlier row "
                   "of the run tuned is not repeated (from 2026-11-28)",
    "gbs_fwd, gbs_fwd_bwd, bw_fraction_*": "attention: GB/s of the minimum traffic, and over "
                                           "the measured device copy bandwidth",
    "*_graph_ms, *_graph": "CUDA: the same call captured once in a CUDA graph and replayed "
                           "(median as above): the time of its kernels without the host's "
                           "launch cost; graph_error says why a capture failed",
    "ratios": "x = baseline / implementation: speed-up, or times less memory (the table's x "
              "columns; in JSON, extra.ratios: fwd_ms, fwd_bwd_ms, saved_mb, peak_mb, and for "
              "nca_rollout peak_with_inputs_mb (from 2026-11-29), against the suite's baseline row of "
              "the same op, config and dtype)",
    "note": "a row whose forward alone took longer than its forward + backward is marked SUSPECT "
            "(from 2026-11-29)",
}


def with_ratios(results: list[Result], baselines: dict[str, str] = BASELINES) -> list[dict]:
    """The results as dicts, each with extra["ratios"] (baseline_ratios) where it has any."""
    rows = [dataclasses.asdict(r) for r in results]
    for row, q in zip(rows, baseline_ratios(rows, baselines)):
        if q:
            row["extra"] = {**row["extra"], "ratios": q}
    return rows


def write_json(path: str, env: dict, roofs: dict, results: list[Result], args: dict) -> None:
    """The results file, replaced atomically: a run killed while writing leaves the previous
    complete file, never a truncated one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"environment": env, "roofs": roofs, "args": args, "definitions": DEFINITIONS,
                   "results": with_ratios(results, BASELINES)}, f, indent=1)
    os.replace(tmp, path)
