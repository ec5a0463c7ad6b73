"""Host cost of fastnca's Triton ops on a machine without a GPU, in two parts:

- ``launch``: Triton's own launch path (``JITFunction.run``: argument binding and
  specialisation, cache lookup, the checks of the globals a kernel reads) for each kernel of
  a Med-NCA ``nca_step`` forward and backward and a GeCA-S attention forward and backward.
  The kernels are compiled for sm_90 with the stand-in driver of
  scripts/triton_sm90_resources.py; only the driver's final launch call is a no-op. Each
  launch an op makes is captured and re-run back to back, warm, and its microseconds are
  printed (and an empty kernel's, for scale); the ops' torch calls, on CPU tensors here,
  are not.
- ``python``: the ops' Python path under TRITON_INTERPRET=1 with every Triton launch
  stubbed out (the launchers, autograd, the torch calls on tiny CPU tensors): a Med-NCA
  rule's ``nca_step`` fwd+bwd and 64-step ``nca_rollout`` fwd+bwd on a 1x32x8x8 state, and
  an attention fwd+bwd (gradients to a packed qkv), with a cProfile of the rollout.

Usage: python scripts/host_cost.py launch|python [--profile N]
Seen on 2 cores (2026-11-27, triton 3.6 for ``launch``): an empty kernel 3 us a launch,
the backward cell kernel 14.5, its conv and input kernels 8-9, the forward 12, the attention
kernels 8-10; ``python``: nca_step fwd+bwd 0.28 ms, a 64-step rollout fwd+bwd 4.9 ms
(~76 us a step), attention fwd+bwd 0.085 ms.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _mednca_rule(dtype):
    """The Med-NCA rule's weights (C=32, hidden 128, F=2, frozen 1), as the benchmark makes
    them (imported here: the ``python`` part sets TRITON_INTERPRET before fastnca loads)."""
    from fastnca.benchmark.nca_step import make_rule

    return make_rule(32, 128, 2, 1, 1, "cpu", dtype)


def launch_costs() -> None:
    global tl  # the empty kernel below reads it from this module's globals
    sys.argv = sys.argv[:1]
    sys.path.insert(0, HERE)
    import triton_sm90_resources as sm90  # noqa: E402 -- installs the stand-in sm_90 driver

    import torch
    import triton
    import triton.language as tl
    import triton.runtime.jit as jit
    from triton.compiler.compiler import CompiledKernel

    def no_launch(self):  # the compiled kernel is never loaded: its launch does nothing
        self.module, self.function, self._run = 0, 0, (lambda *a, **k: None)
        self.n_regs = self.n_spills = 0

    CompiledKernel._init_handles = no_launch
    run = sm90._run  # JITFunction.run, not the compile-only wrapper
    captured: list = []

    def capture(self, *args, **kwargs):
        captured.append((self, args, kwargs))
        return run(self, *args, **kwargs)

    def per_launch_us(self, args, kwargs, n=200):
        """Each captured launch again, n times back to back: the launch path alone, warm (on
        a GPU host the ops' torch calls are asynchronous and leave it warm too)."""
        for _ in range(10):
            run(self, *args, **kwargs)
        t0 = time.perf_counter()
        for _ in range(n):
            run(self, *args, **kwargs)
        return (time.perf_counter() - t0) / n * 1e6

    jit.JITFunction.run = capture
    tri, tri_na = sm90.tri, sm90.tri_na
    dt = torch.bfloat16
    x = torch.randn(8, 32, 256, 256, dtype=dt).contiguous(memory_format=torch.channels_last)
    w = [t.detach() for t in _mednca_rule(dt)]
    args = (*w, 1, "reflect", 0.5, 1, 2, 1)
    rule = tri.prepare(x, *w, 1, "reflect", 1)
    g = torch.randn_like(x)
    xs = x[:, :, :64, :64].contiguous(memory_format=torch.channels_last)  # Med-NCA's training states
    gs = torch.randn_like(xs)
    q, k, v = (torch.randn(32, 32, 32, 12, 64, dtype=dt) for _ in range(3))
    o, lse = tri_na.forward(q, k, v, 3, "zeros", 0.125)
    ops = {
        "nca_step forward (B=8, 256x256)": lambda: tri.forward(x, *args, prepared=rule),
        "nca_step backward": lambda: tri.backward(g, x, *args, prepared=rule),
        "nca_step forward (B=8, 64x64)": lambda: tri.forward(xs, *args, prepared=rule),
        "nca_step backward (B=8, 64x64)": lambda: tri.backward(gs, xs, *args, prepared=rule),
        "attention forward (GeCA-S)": lambda: tri_na.forward(q, k, v, 3, "zeros", 0.125),
        "attention backward": lambda: tri_na.backward(torch.randn_like(o), None, q, k, v, o, lse, 3, "zeros", 0.125),
    }
    for name, fn in ops.items():
        fn()  # compiles (or reads Triton's cache)
        captured.clear()
        fn()
        costs: dict = {}
        for self, a, kw in captured:
            costs.setdefault(self.fn.__name__, []).append(per_launch_us(self, a, kw))
        print(f"{name}: " + ", ".join(f"{kn} {len(c)} x {sum(c) / len(c):.1f} us" for kn, c in costs.items()),
              flush=True)
    jit.JITFunction.run = run

    @triton.jit
    def _empty(x_ptr, BLOCK: tl.constexpr):
        pass

    buf = torch.empty(16)
    _empty[(1,)](buf, BLOCK=16)
    print(f"empty kernel: {per_launch_us(_empty, (buf,), dict(BLOCK=16, grid=(1,), warmup=False)):.1f} us a launch")


def python_costs(profile: int) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    import cProfile
    import pstats

    import torch
    import triton.runtime.interpreter as interpreter

    interpreter.InterpretedFunction.run = lambda self, *a, **k: None  # every Triton launch stubbed
    import fastnca

    w = _mednca_rule(torch.float32)
    x = torch.randn(1, 32, 8, 8, requires_grad=True)
    qkv = torch.randn(1, 4, 4, 3, 2, 16, requires_grad=True)  # tiny: the torch calls cost ~nothing
    kw = dict(seed=1, frozen_channels=1, backend="triton")

    def step():
        torch.autograd.grad(fastnca.nca_step(x, *w, **kw).sum(), [x, *w])

    def rollout():
        torch.autograd.grad(fastnca.nca_rollout(x, *w, steps=64, **kw).sum(), [x, *w])

    def attention():
        q, k, v = qkv.unbind(3)
        torch.autograd.grad(fastnca.neighborhood_attention2d(q, k, v, backend="triton").sum(), [qkv])

    for name, fn, n in (("nca_step fwd+bwd", step, 50), ("nca_rollout fwd+bwd, 64 steps", rollout, 5),
                        ("attention fwd+bwd", attention, 50)):
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        print(f"{name}: {(time.perf_counter() - t0) / n * 1e3:.3f} ms of Python a call (launches stubbed)",
              flush=True)
    if profile:
        pr = cProfile.Profile()
        pr.enable()
        rollout()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(profile)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["launch", "python"])
    ap.add_argument("--profile", type=int, default=0, help="python: print the N top functions of a rollout")
    a = ap.parse_args()
    if a.part == "launch":
        launch_costs()
    else:
        python_costs(a.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
