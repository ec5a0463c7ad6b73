"""One forward + backward of a fastnca op between cudaProfilerStart/Stop, after a warm-up
(compiles, autotuning), for Nsight Compute: scripts/gpu_session.sh's `ncu` stage runs

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy ... \
        python scripts/profile_gpu.py nca --backend cuda --dtype bfloat16

so only the op's own kernels are profiled; `python scripts/profile_gpu.py --summarize
REPORT.csv` prints the key metrics of each kernel from that CSV, and `--summarize-source
SOURCE.csv` the source lines with the most warp-stall samples from an `ncu --page source`
export (the `ncu-source` stage). With `--timeline N`
(no ncu), N more iterations run under torch.profiler instead, and it prints the wall time
per iteration (CUDA events) against the GPU time its kernels take and the host time of
the Python/autograd path: wall well above kernel time means the op is launch- or
host-bound there. Shapes are the benchmark's: the Med-NCA rule
(C=32, hidden 128, F=2, reflect, frozen 1) on B=8 x 256x256 for `nca`; GeCA-S attention
(B=32, 32x32, 12 heads, D=64) for `attention`; `rollout`: a 64-step nca_rollout of the
Med-NCA rule on B=8 x 64x64, the states Med-NCA trains on (its patches and its downscaled
first stage), where the host sets the pace.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

import torch  # noqa: E402

import fastnca  # noqa: E402
from fastnca.benchmark.nca_step import make_rule  # noqa: E402


KEY_METRICS = ("Duration", "Compute (SM) Throughput", "Memory Throughput", "DRAM Throughput",
               "L1/TEX Hit Rate", "L2 Hit Rate", "Registers Per Thread", "Dynamic Shared Memory Per Block",
               "Theoretical Occupancy", "Achieved Occupancy", "Warp Cycles Per Issued Instruction",
               "Executed Ipc Active", "Local Memory Spilling Requests")


def summarize(path: str) -> int:
    """Print the key metrics of an `ncu --csv --page details` report, one block per kernel."""
    import csv

    kernels: dict[str, dict[str, str]] = {}
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    header = next((i for i, r in enumerate(rows) if "Metric Name" in r), None)
    if header is None:
        print(f"{path}: no ncu metrics found")
        return 1
    cols = {name: i for i, name in enumerate(rows[header])}
    for r in rows[header + 1:]:
        if len(r) <= cols["Metric Value"]:  # (rows omit the trailing empty rule columns)
            continue
        key = f"{r[cols['ID']]} {r[cols['Kernel Name']][:90]}"
        kernels.setdefault(key, {})[r[cols["Metric Name"]]] = f"{r[cols['Metric Value']]} {r[cols['Metric Unit']]}"
    for key, metrics in kernels.items():
        print(key)
        for name in KEY_METRICS:
            if name in metrics:
                print(f"    {name:<36}{metrics[name]}")
    return 0


def summarize_source(path: str, top: int = 25) -> int:
    """Print the source lines with the most warp-stall samples from an `ncu --page source
    --csv` export (one table per profiled kernel; a table starts at each header row): where
    each kernel's warps wait, by line of its Triton (Python) or CUDA source."""
    import csv

    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    tables, header, body = [], None, []
    for r in rows:
        if any(c.startswith("Warp Stall Sampling (All") for c in r):
            if header is not None:
                tables.append((header, body))
            header, body = r, []
        elif header is not None and len(r) == len(header):
            body.append(r)
        elif header is None and r:
            print("  " + " ".join(r)[:160])  # what ncu printed before the first table
    if header is not None:
        tables.append((header, body))
    if not tables:
        print(f"{path}: no source table with warp-stall samples found")
        return 1

    def number(v):
        try:
            return float(v.replace(",", ""))
        except ValueError:
            return 0.0

    for i, (header, body) in enumerate(tables):
        col = {name: j for j, name in enumerate(header)}
        stall = next(j for name, j in col.items() if name.startswith("Warp Stall Sampling (All"))
        text = col.get("Source", len(header) - 1)
        line = col.get("#", col.get("Line"))
        executed = next((j for name, j in col.items() if name.startswith("Instructions Executed")), None)
        total = sum(number(r[stall]) for r in body) or 1.0
        print(f"table {i}: {len(body)} lines, {total:.0f} warp-stall samples")
        for r in sorted(body, key=lambda r: -number(r[stall]))[:top]:
            where = f"{r[line]:>5} " if line is not None else ""
            inst = f" inst {number(r[executed]):>12.0f}" if executed is not None else ""
            print(f"  {100 * number(r[stall]) / total:5.1f}%{inst}  {where}{r[text].strip()[:110]}")
    return 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        return summarize(sys.argv[2])
    if len(sys.argv) == 3 and sys.argv[1] == "--summarize-source":
        return summarize_source(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("op", choices=["nca", "attention", "rollout"])
    ap.add_argument("--backend", default="cuda", choices=["cuda", "triton"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--groups", default="1", help="1 or C (depthwise), nca only")
    ap.add_argument("--timeline", type=int, default=0, metavar="N",
                    help="N iterations under torch.profiler: wall vs kernel vs host time per iteration")
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dev, dtype).requires_grad_(True)

    if args.op in ("nca", "rollout"):
        C, hid, F = (32, 128, 2) if args.groups == "1" else (16, 128, 2)
        groups = 1 if args.groups == "1" else C
        size = 256 if args.op == "nca" else 64
        x = rnd(8, C, size, size).detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        rule = make_rule(C, hid, F, groups, 1, dev, dtype)
        kw = dict(groups=groups, padding="reflect" if groups == 1 else "zeros", update_prob=0.5, frozen_channels=1,
                  seed=1, backend=args.backend)

        def run():
            if args.op == "nca":
                y = fastnca.nca_step(x, *rule, step=0, **kw)
            else:
                y = fastnca.nca_rollout(x, *rule, steps=64, **kw)
            y.backward(torch.ones_like(y))
    else:
        qkv = rnd(32, 32, 32, 3, 12, 64)
        q, k, v = qkv.unbind(3)

        do = torch.randn(q.shape, generator=g).to(dev, dtype)

        def run():  # as the benchmark: packed qkv, a random output gradient
            o = fastnca.neighborhood_attention2d(q, k, v, backend=args.backend)
            o.backward(do)

    for _ in range(3):  # compiles and autotuning happen here, outside the profiled range
        run()
    torch.cuda.synchronize()
    if args.timeline:
        return timeline(run, args.timeline)
    torch.cuda.profiler.start()
    run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


def launch_costs(n: int = 2000) -> None:
    """Host microseconds per call, back to back without waiting on the GPU, of an empty
    Triton kernel's launch and of a small torch op on this machine: the floor under every
    eager call (the H200 run saw ~1.2 ms of host time per attention fwd+bwd, three Triton
    launches, against ~0.1 ms of Python measured with the launches stubbed on a CPU)."""
    from fastnca.kernels.triton._runtime import _probe

    t = torch.empty(1, device="cuda")
    for name, call in (("empty Triton kernel launch", lambda: _probe[(1,)]()),
                       ("torch.empty(1) on cuda", lambda: torch.empty(1, device="cuda")),
                       ("t.add_(1) on cuda", lambda: t.add_(1))):
        call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        us = (time.perf_counter() - t0) * 1e6 / n
        torch.cuda.synchronize()
        print(f"host cost: {us:7.1f} us per {name}")


def timeline(run, n: int) -> int:
    """Wall time per iteration of ``run`` (CUDA events over n back-to-back calls), the host
    time to enqueue them (no profiler: when it nears the wall time the loop is host-bound),
    the GPU time of its kernels and the host time of the calls (torch.profiler), and the
    kernels."""
    from torch.profiler import ProfilerActivity, profile, record_function

    launch_costs()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    t0 = time.perf_counter()
    for _ in range(n):
        run()
    issue = (time.perf_counter() - t0) * 1e3 / n  # host time to enqueue, no waiting on the GPU
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / n
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            with record_function("iteration"):  # one range around the whole call
                run()
        torch.cuda.synchronize()
    events = prof.key_averages()
    dev_attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    kernels = [e for e in events if getattr(e, dev_attr) > 0 and e.device_type.name in ("CUDA", "PrivateUse1")]
    gpu = sum(getattr(e, dev_attr) for e in kernels) / n / 1e3
    # the "iteration" range: the whole call (until 2026-11-29 the largest range, which was
    # the backward's autograd node alone, without the forward's)
    host = next(e.cpu_time_total for e in events if e.key == "iteration") / n / 1e3
    print(f"per iteration: wall {wall:.3f} ms, kernels {gpu:.3f} ms, host enqueue {issue:.3f} ms "
          f"(unprofiled; close to wall: host-bound), host under the profiler (whole iteration) {host:.3f} ms")
    for e in sorted(kernels, key=lambda e: -getattr(e, dev_attr))[:15]:
        print(f"  {getattr(e, dev_attr) / n / 1e3:8.3f} ms  x{e.count // n:<3} {e.key[:90]}")
    # Where the host time goes: the host events with the most self time (a cudaMalloc /
    # cudaFree or a synchronisation here explains a wall far above the kernels), then the
    # Python functions of the same loop (cProfile, no torch.profiler).
    print("host events by self time per iteration:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"  {e.self_cpu_time_total / n / 1e3:8.3f} ms  x{e.count / n:<5.1f} {e.key[:90]}")
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        run()
    torch.cuda.synchronize()
    pr.disable()
    print(f"Python functions by own time over {n} iterations:")
    pstats.Stats(pr).sort_stats("tottime").print_stats(20)
    # and by time including callees, fastnca's and Triton's own functions only: which
    # launcher or check holds the host time (the 1.9 ms a step of the seventh run)
    print(f"fastnca and Triton functions by cumulative time over {n} iterations:")
    pstats.Stats(pr).sort_stats("cumulative").print_stats(r"fastnca|triton", 30)
    # the same loop's wall time with one synchronisation per call: a call that waits on the
    # GPU somewhere inside (a hidden sync) costs about the same either way
    t0 = time.perf_counter()
    for _ in range(n):
        run()
        torch.cuda.synchronize()
    print(f"per iteration with a synchronisation after each call: {(time.perf_counter() - t0) * 1e3 / n:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
