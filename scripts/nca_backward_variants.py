"""Time the nca_step backward kernels alone on a GPU, per variant, for choosing defaults:
the Triton backward's tile (FASTNCA_TRITON_NCA_BWD_TILE=BLOCK_M,WARPS[,STAGES[,REGS]], REGS
a register cap a thread), where its weight-grad partials live
(FASTNCA_TRITON_NCA_BWD_ACC=registers|mixed|memory, or gemm: none in the cell kernel, the fc
weight gradients as GEMMs over a workspace of activations, or chunked: the hidden-chunk cell
kernel with its partials in memory) and dot precision ("default":
every precision knob unset, what ships; "split-bwd": the default with
FASTNCA_TRITON_NCA_BWD_TF32=0, the backward's gradient-only products split hi + lo as
before 2026-11-27; "tf32x3": 3xTF32 with one or two TF32 products where an
operand comes from a half tensor, no bfloat16 dots; "bf16-dots": that with bfloat16 dots;
"tf32x3-all": 3xTF32 for every product, FASTNCA_TRITON_NCA_EXACT=0; "fp32-weights": the
default with FASTNCA_TRITON_NCA_HALF_WEIGHTS=0 (bfloat16 dots read the float32 weights, the
default before 2026-11-28, not their bfloat16 copy); or TF32 under
torch.backends.cuda.matmul.allow_tf32), beside the CUDA backward.
With --rollout, also a 64-step nca_rollout forward+backward on each backend (default
Triton settings, then TF32 and the opt-in modes: the forward in hidden chunks, the input
kernel capped at 96 registers, =gemm, =chunked) and in eager PyTorch
(benchmark.nca_step.PaperStep), same state, in --rounds interleaved rounds.

Med-NCA rule (C=32, hidden 128, F=2, reflect, frozen 1) unless --rule says otherwise;
B=8, 256x256 bfloat16 state by default. Each variant: the median [min-max] over --rounds
rounds of the CUDA-event time per call of a batch of back-to-back calls of backend.backward
(the kernels and the launcher, no autograd), the rounds interleaving the variants; and the
largest difference of its gradients from the first variant's. A variant that fails is
reported.

Usage: python scripts/nca_backward_variants.py [--rule C,hidden,F,groups,frozen]
           [--shape B,H,W] [--dtype bfloat16] [--tiles 16,4 32,4 32,8,2 ...]
           [--input-tiles 64,4 128,8 ...] [--acc registers mixed memory gemm] [--prec default split-bwd fp32-weights tf32x3 tf32x3-all tf32 bf16-dots]
           [--variant TILE[/INPUT_TILE]:ACC:PREC ...] [--rounds 7] [--no-cuda] [--rollout] [--rollout-steps 64]
           [--device cuda]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

import torch  # noqa: E402

import fastnca  # noqa: E402
from fastnca import _backend  # noqa: E402
from fastnca.benchmark.common import batch_ms, batch_size, env, peak_mb, sync  # noqa: E402
from fastnca.benchmark.nca_step import PaperStep, _tf32, make_rule  # noqa: E402
from fastnca.kernels.triton._runtime import tuned_configs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rule", default="32,128,2,1,1", help="C,hidden,F,groups,frozen")
    ap.add_argument("--shape", default="8,256,256", help="B,H,W")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test under TRITON_INTERPRET=1")
    ap.add_argument("--tiles", nargs="*", default=["", "16,8", "32,4", "32,8"],
                    help="Triton backward tiles BLOCK_M,WARPS[,STAGES[,REGS]] ('' or 'default' = the default choice)")
    ap.add_argument("--input-tiles", nargs="*", default=[""],
                    help="input-gradient kernel tiles BLOCK_M,WARPS[,STAGES[,REGS]] "
                         "('' or 'default' = the default choice)")
    ap.add_argument("--acc", nargs="*", default=[""],
                    help="registers / mixed / memory / gemm / chunked ('' or 'default' = the default)")
    ap.add_argument("--prec", nargs="*", default=["default", "split-bwd", "fp32-weights", "tf32x3", "tf32"],
                    help="default (no precision knob set) / split-bwd (FASTNCA_TRITON_NCA_BWD_TF32=0) / "
                         "fp32-weights (FASTNCA_TRITON_NCA_HALF_WEIGHTS=0) / tf32x3 / "
                         "tf32x3-all / tf32 (these three with FASTNCA_TRITON_NCA_BF16_DOTS=0 and BWD_TF32=0) / "
                         "bf16-dots (tf32x3 with FASTNCA_TRITON_NCA_BF16_DOTS=1, BWD_TF32=0)")
    ap.add_argument("--variant", nargs="*", default=[],
                    help="explicit variants TILE[/INPUT_TILE]:ACC:PREC ('default' or '' for a default part), "
                         "e.g. default:default:default 64,4:chunked:default default/64,4,1,96:default:default; "
                         "replaces the product of --tiles, --input-tiles, --acc and --prec")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (one batch per variant each)")
    ap.add_argument("--no-cuda", action="store_true", help="leave out the CUDA backward")
    ap.add_argument("--rollout", action="store_true", help="also time a rollout fwd+bwd (--rollout-steps)")
    ap.add_argument("--rollout-steps", type=int, default=64, help="the rollout's steps (default 64)")
    a = ap.parse_args()
    precs = ("default", "split-bwd", "fp32-weights", "tf32x3", "tf32x3-all", "tf32", "bf16-dots")
    for prec in a.prec + [v.split(":")[2] for v in a.variant if v.count(":") == 2]:
        if prec not in precs and prec != "":  # a removed name ("half-weights", the default now) is no variant
            ap.error(f"precision {prec!r}: choose from {', '.join(precs)}")
    for opt in ("tiles", "input_tiles", "acc"):  # 'default' spells '' where quoting is awkward
        setattr(a, opt, ["" if v == "default" else v for v in getattr(a, opt)])
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device (or --device cpu under TRITON_INTERPRET=1)")
        return 2
    C, hidden, F, groups, frozen = (int(t) for t in a.rule.split(","))
    groups = C if groups != 1 else 1
    B, H, W = (int(t) for t in a.shape.split(","))
    dtype = getattr(torch, a.dtype)
    w = [t.detach() for t in make_rule(C, hidden, F, groups, frozen, dev, dtype)]
    g = torch.Generator().manual_seed(1)
    x, gout = (torch.randn(B, C, H, W, generator=g).to(dev, dtype).contiguous(memory_format=torch.channels_last)
               for _ in range(2))
    args = (*w, groups, "reflect", 0.5, 1, 3, frozen)

    use_cuda = not a.no_cuda and _backend._usable_on("cuda", dev) is True
    variants = [("cuda", "cuda", (None, None), None, "")] if use_cuda else []
    if a.variant:  # explicit TILE:ACC:PREC triples instead of the product of the lists
        combos = []
        for v in a.variant:
            parts = v.split(":")
            if len(parts) != 3:
                ap.error(f"--variant takes TILE[/INPUT_TILE]:ACC:PREC, got {v!r}")
            t, acc, prec = ("" if p == "default" else p for p in parts)
            t, _, it = t.partition("/")  # TILE/INPUT_TILE: the input kernel's tile too
            combos.append(("" if t == "default" else t, "" if it == "default" else it, acc, prec or "default"))
    else:
        combos = [(t, it, acc, prec) for t in a.tiles for it in a.input_tiles for acc in a.acc for prec in a.prec]
    for t, it, acc, prec in combos:
        label = {"tf32": "TF32", "tf32x3-all": "3xTF32 all", "bf16-dots": "3xTF32 bf16 dots",
                 "default": "default prec", "split-bwd": "split bwd",
                 "fp32-weights": "fp32 weights"}.get(prec, "3xTF32")
        name = f"triton tile={t or 'default'}{f' input={it}' if it else ''} acc={acc or 'default'} {label}"
        variants.append((name, "triton", (t, it), acc, prec))
    print(f"nca_step backward, rule C={C} hidden={hidden} F={F} groups={groups} frozen={frozen}, "
          f"{a.dtype} state [{B}, {C}, {H}, {W}], "
          f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}; "
          f"{a.rounds} interleaved rounds")
    # Compile and check every variant first, then time them round-robin: each round times
    # one batch of every variant in turn, so drift of the clocks or of other tenants over the
    # run spreads over all variants instead of landing on the ones timed last.
    ready, first = [], None
    for name, backend, tile, acc, prec in variants:
        kern = _backend.kernel(backend, "nca_step")
        knobs = dict(FASTNCA_TRITON_NCA_BWD_TILE=tile[0] or None, FASTNCA_TRITON_NCA_BWD_INPUT_TILE=tile[1] or None,
                     FASTNCA_TRITON_NCA_BWD_ACC=acc or None,
                     FASTNCA_TRITON_NCA_EXACT="0" if prec == "tf32x3-all" else None,
                     FASTNCA_TRITON_NCA_BF16_DOTS=(None if prec in ("default", "split-bwd", "fp32-weights")
                                                   else "1" if prec == "bf16-dots" else "0"),
                     FASTNCA_TRITON_NCA_BWD_TF32=None if prec in ("default", "fp32-weights") else "0",
                     FASTNCA_TRITON_NCA_HALF_WEIGHTS="0" if prec == "fp32-weights" else None,
                     FASTNCA_TRITON_NCA_HALF_DQ=None)  # the default, whatever the caller exported

        def call(kern=kern):
            return kern.backward(gout, x, *args)

        try:
            with env(**knobs), _tf32(prec == "tf32"):
                grads = call()
                sync(dev)
                inner = batch_size(call, dev)
        except Exception as e:  # a variant that does not compile or fit is reported
            print(f"  {name:<48} failed: {type(e).__name__}: {str(e)[:100]}")
            continue
        if first is None:
            first = grads
        # Largest over the 7 gradients of the max-norm and of the 2-norm relative difference
        # from the first variant: a relu that flips under a coarser product changes a few
        # cells fully (max-norm), which the 2-norm weighs by how few they are.
        diff = max(float((u.float() - v.float()).abs().max() / v.float().abs().max().clamp_min(1e-30))
                   for u, v in zip(grads, first))
        diff2 = max(float((u.float() - v.float()).norm() / v.float().norm().clamp_min(1e-30))
                    for u, v in zip(grads, first))
        ready.append((name, call, knobs, prec, inner, diff, diff2, []))
    failed = set()
    for _ in range(a.rounds):
        for name, call, knobs, prec, inner, *_, times in ready:
            if name in failed:
                continue
            try:
                with env(**knobs), _tf32(prec == "tf32"):
                    times.append(batch_ms(call, dev, inner))
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory: that variant stops
                print(f"  {name:<48} failed while timed: {type(e).__name__}: {str(e)[:100]}")
                failed.add(name)
    for name, _, _, _, _, diff, diff2, times in ready:
        if name in failed or not times:
            continue
        print(f"  {name:<48} {statistics.median(times):8.3f} ms [{min(times):.3f}-{max(times):.3f}]   "
              f"rel. diff vs first: max-norm {diff:.2e}, 2-norm {diff2:.2e}", flush=True)
    if a.rollout:
        _time_rollouts(x, w, groups, frozen, ["cuda"] * use_cuda + ["triton"], dev, a.rounds, a.rollout_steps)
    return 0



def _time_rollouts(x, w, groups, frozen, backends, dev, rounds, steps):
    """A `steps`-step rollout fwd+bwd: each fastnca backend (Triton: also its opt-in modes) and eager
    PyTorch. Each run once to warm up, then `rounds` interleaved rounds of one timed call
    each (a rollout is long enough for one): the median [min-max], and the peak memory of
    one training step. A run that fails is reported and left out of the later rounds."""
    print(f"nca_rollout fwd+bwd, {steps} steps, {rounds} interleaved rounds")
    leaves = [t.detach().requires_grad_() for t in w]
    eager = PaperStep(leaves, groups, "reflect", 0.5, frozen)

    def run_eager():
        s = x.permute(0, 2, 3, 1).detach().requires_grad_()  # [B, H, W, C] (Med-NCA layout)
        y = s
        for _ in range(steps):
            y = eager(y)
        y.float().sum().backward()

    def run(backend, acc=None, bwd_tf32=None, half_weights=None, fwd_hchunk=None, input_tile=None):
        s = x.detach().requires_grad_()
        with env(FASTNCA_TRITON_NCA_EXACT=None, FASTNCA_TRITON_NCA_BWD_ACC=acc, FASTNCA_TRITON_NCA_BF16_DOTS=None,
                 FASTNCA_TRITON_NCA_HALF_DQ=None,
                 FASTNCA_TRITON_NCA_BWD_TF32=bwd_tf32, FASTNCA_TRITON_NCA_HALF_WEIGHTS=half_weights,
                 FASTNCA_TRITON_NCA_FWD_HCHUNK=fwd_hchunk, FASTNCA_TRITON_NCA_BWD_INPUT_TILE=input_tile):
            y = fastnca.nca_rollout(s, *leaves, steps=steps, groups=groups, padding="reflect", update_prob=0.5,
                                    seed=1, frozen_channels=frozen, backend=backend)
            y.float().sum().backward()

    runs = [("eager", run_eager, False)]
    for b in backends:
        runs.append((b, lambda b=b: run(b), False))
        if b == "triton":
            runs.append(("triton TF32", lambda: run("triton"), True))
            # opt-in (session 22): the forward's hidden layer 32 units at a time (two forwards a step)
            runs.append(("triton fwd-hchunk 32", lambda: run("triton", fwd_hchunk="32"), False))
            # opt-in (session 26): the input kernel capped at 96 registers (5 blocks an SM, not 4)
            runs.append(("triton input 64,4,1,96", lambda: run("triton", input_tile="64,4,1,96"), False))
            runs.append(("triton split-bwd", lambda: run("triton", bwd_tf32="0"), False))  # before 2026-11-27
            runs.append(("triton fp32-weights", lambda: run("triton", half_weights="0"), False))  # before 2026-11-28
            for acc in ("gemm", "chunked"):  # opt-in
                runs.append((f"triton {acc}", lambda acc=acc: run("triton", acc=acc), False))

    def attempt(name, fn, tf32, measure):
        """(True, measure(fn)), or (False, None) with the failure reported."""
        try:
            with _tf32(tf32):
                return True, measure(fn)
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory: reported, left out
            print(f"  {name:<30} failed: {type(e).__name__}: {str(e)[:100]}", flush=True)
            return False, None
        finally:
            for t in leaves:
                t.grad = None

    def warm_peak(fn):
        fn()
        sync(dev)
        return peak_mb(fn, dev)  # None off CUDA

    ready = []  # [name, fn, tf32, peak, times]
    for name, fn, tf32 in runs:
        ok, peak = attempt(name, fn, tf32, warm_peak)
        if ok:
            ready.append([name, fn, tf32, peak, []])
    for _ in range(rounds):
        for r in [r for r in ready if r[4] is not None]:
            ok, ms = attempt(r[0], r[1], r[2], lambda f: batch_ms(f, dev, 1))
            if ok:
                r[4].append(ms)
            else:
                r[4] = None  # failed: out of the later rounds and the report
    for name, _, _, peak, times in ready:
        if times:
            print(f"  {name:<30} {statistics.median(times):9.1f} ms [{min(times):.1f}-{max(times):.1f}]   "
                  f"peak {float('nan') if peak is None else peak:8.0f} MiB", flush=True)
    # what the forward's autotuner picked per key (HC > 0: the fwd-hchunk row, whose
    # candidates include a register cap, maxnreg)
    for key, config in tuned_configs().items():
        if key.startswith("_nca_step_forward_kernel"):
            print(f"  tuned {key}: {config}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
