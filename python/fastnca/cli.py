"""The ``fastnca`` command: ``fastnca bench`` runs the benchmarks on whatever device is
here and prints a table; ``fastnca plot`` draws its JSON results; ``fastnca info`` says
which backends are usable and why not."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch


def _info(args) -> int:
    import fastnca

    print(f"fastnca {fastnca.__version__}, torch {torch.__version__}")
    for name, status in fastnca.backends().items():
        print(f"  {name:<10} {'available' if status is True else status}")
    return 0


def _bench(args) -> int:
    from .benchmark import common, nca_step, neighborhood_attention

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = args.dtype or (["bfloat16", "float32"] if device.type == "cuda" else ["float32"])
    suites = {"nca": nca_step.run, "attention": neighborhood_attention.run}
    args.ops = [name.strip() for part in args.ops or () for name in part.split(",") if name.strip()] or None
    if not args.quick or args.ops:  # under --quick the model suites run only when named in --ops
        from .benchmark import models
        suites.update(models.SUITES)
    unknown = [name for name in args.ops or () if name not in suites]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; choose from {list(suites)}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    # Every config compiles the baselines anew (shapes, requires_grad): let dynamo keep them
    # all instead of silently falling back to eager after the default 8 recompiles.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    env = common.environment(device)
    print(f"fastnca bench on {env['device']} ({device.type}, {env['threads']} threads), torch {env['torch']}"
          f", triton {env['triton']}, cuda {env['cuda']}, commit {str(env.get('git_commit'))[:10]}")
    t0 = time.time()
    roofs = {"copy_gbs": common.copy_bandwidth_gbs(device)}
    for d in dtypes:
        roofs[f"matmul_{d}_gflops"] = common.matmul_roof_gflops(device, getattr(torch, d))
    if device.type == "cuda" and "float32" in dtypes:  # single-TF32 roof (3xTF32 reaches ~1/3 of it)
        roofs["matmul_tf32_gflops"] = common.matmul_roof_gflops(device, torch.float32, tf32=True)
    print("roofs: " + ", ".join(f"{k}={v:.1f}" for k, v in roofs.items()))

    record = bool(args.json) and not args.warm_only
    run_args = {k: v for k, v in vars(args).items() if k != "func"}

    def stopped(signum, frame):  # a time limit's SIGTERM: keep what was measured so far
        common.write_json(args.json, env, roofs, list(common.MADE), {**run_args, "stopped_early": True})
        print(f"stopped by signal {signum}; wrote {len(common.MADE)} results to {args.json}", flush=True)
        sys.exit(128 + signum)

    previous = None
    if record:
        try:
            previous = signal.signal(signal.SIGTERM, stopped)
        except ValueError:  # not the main thread: no handler, the per-suite writes remain
            pass
    common.MADE.clear()
    common.WARM_ONLY = args.warm_only
    common.IMPLS = [part for part in (args.impls or "").split(",") if part] or None
    common.VARIANTS = args.variants
    results = []
    written = [0]

    def log(message):
        """A suite's progress line. Before each new measurement the results made so far are
        written, marked partial: a run killed outright (SIGKILL, or a SIGTERM that lands in a
        long compile and is followed by the kill) keeps every row it finished."""
        if record and len(common.MADE) > written[0]:
            common.write_json(args.json, env, roofs, list(common.MADE), {**run_args, "partial": True})
            written[0] = len(common.MADE)
        print(message, flush=True)

    try:
        for name in args.ops or list(suites):
            for d in dtypes:
                print(f"[{name} {d}]", flush=True)
                got = suites[name](device, getattr(torch, d), args.quick, roofs, log=log)
                for r in got:
                    print(f"    {r.op} | {r.config} | {r.impl}: fwd {common.fmt(r.fwd_ms)} ms, fwd+bwd "
                          f"{common.fmt(r.fwd_bwd_ms)} ms, peak {common.fmt(r.peak_mb)} MB {r.note}{r.noisy()}",
                          flush=True)
                results += got
                if record:  # after every suite: complete so far
                    common.write_json(args.json, env, roofs, results, run_args)
                    written[0] = len(common.MADE)
    finally:
        common.WARM_ONLY = common.VARIANTS = False
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    common.print_table(results)
    idle = [part for part in common.IMPLS or () if not any(part in r.impl for r in results)]
    if idle and not args.warm_only:
        print(f"\n--impls {', '.join(idle)}: no implementation of that name ran here (the Triton and CUDA "
              "backends need a GPU, and --quick skips torch.compile on the CPU; `fastnca info` lists the "
              "usable backends)")
    print(f"\n{time.time() - t0:.0f} s")
    if record:
        print(f"wrote {args.json}")
    return 0


def _plot(args) -> int:
    try:
        from .benchmark import plot
        import matplotlib  # noqa: F401
    except ImportError:
        print("fastnca plot needs matplotlib: pip install 'fastnca[plot]'", file=sys.stderr)
        return 2
    for path in args.results:
        print(f"wrote {plot.plot_file(path, args.out or os.path.dirname(os.path.abspath(path)))}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastnca", description=__doc__)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fastnca {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the speed/memory benchmarks and print a table")
    b.add_argument("--quick", action="store_true",
                   help="small shapes, under a minute on 2 CPU cores (model suites only when named in --ops)")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    b.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"],
                   help="repeatable; default bfloat16 and float32 on GPU, float32 on CPU")
    b.add_argument("--ops", action="append",
                   help="suites to run, repeatable or comma list: nca, attention, mednca, geca (default: all)")
    b.add_argument("--json", help="write the results (with device and versions) to this JSON file")
    b.add_argument("--impls", help="comma list: run only implementations whose names contain one of these "
                                   "(each suite's baseline always runs), e.g. 'compile,fastnca:triton'")
    b.add_argument("--warm-only", action="store_true",
                   help="run every implementation once and time nothing: fills the Triton and "
                        "Inductor compile caches ahead of a timed run (writes no JSON)")
    b.add_argument("--variants", action="store_true",
                   help="GPU: also time the opt-in Triton formulations and the older defaults (the rows "
                        "that decide defaults; several minutes more)")
    b.set_defaults(func=_bench)
    p = sub.add_parser("plot", help="draw fastnca bench --json results (time and memory per implementation)")
    p.add_argument("results", nargs="+", help="JSON files written by fastnca bench --json")
    p.add_argument("--out", help="folder for the PNGs (default: next to each JSON file)")
    p.set_defaults(func=_plot)
    i = sub.add_parser("info", help="list backends and why any is unavailable")
    i.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
