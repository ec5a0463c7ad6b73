"""nca_step / nca_rollout against the NCA update written the way the papers' code does it
(conv perception + linear layers under autograd, Med-NCA's channels-last layout)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import fastnca

from .._checks import dtype_name
from . import common
from .common import (Result, env, graph_times, median_ms, peak_mb, release, saved_mb, selected, timed_backends,
                     tuned_now, tuned_since)


class PaperStep(torch.nn.Module):
    """One Med-NCA-style step in plain PyTorch: state [B, H, W, C] channels-last, perception
    convs applied after transpose(1, 3), Linear layers, mask drawn per step on the device."""

    def __init__(self, rule, groups, padding, update_prob, frozen, host_mask=False):
        super().__init__()
        pw, pb, w1, b1, w2, b2 = rule
        self.pw, self.pb, self.w1, self.b1, self.w2, self.b2 = pw, pb, w1, b1, w2, b2
        self.groups, self.update_prob, self.frozen = groups, update_prob, frozen
        self.mode = {"zeros": "constant"}.get(padding, padding)
        self.host_mask = host_mask  # the original Med-NCA draws the mask on the CPU

    def forward(self, s):
        x = s.transpose(1, 3)
        conv = F.conv2d(F.pad(x, (1, 1, 1, 1), mode=self.mode), self.pw, self.pb, groups=self.groups)
        p = torch.cat([x, conv], 1).transpose(1, 3)
        dx = F.linear(torch.relu(F.linear(p, self.w1, self.b1)), self.w2, self.b2)
        if self.host_mask:
            m = (torch.rand(s.shape[:3] + (1,)) < self.update_prob).to(s.device, s.dtype)
        else:
            m = (torch.rand(s.shape[:3] + (1,), device=s.device) < self.update_prob).to(s.dtype)
        f = self.frozen
        return torch.cat([s[..., :f], s[..., f:] + m * dx], -1)


@contextlib.contextmanager
def _tf32(matmul: bool, cudnn: bool | None = None):
    """torch.backends.cuda.matmul.allow_tf32 (and cudnn.allow_tf32 unless None) set to the
    given values inside the block, both ways, and restored after it. matmul=True is the
    user's switch that lets the Triton nca kernels take single TF32 products; (False,
    False) runs cuBLAS and cuDNN in float32, for the reference backend's row on a GPU."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = matmul
    if cudnn is not None:
        torch.backends.cudnn.allow_tf32 = cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _kept(forward):
    """Run ``forward`` with grad enabled, for measuring what autograd keeps."""
    with torch.enable_grad():
        return forward()


def flops_per_cell(C, hidden, nf, groups, frozen=0):
    """FLOPs (a multiply-add is 2) of one cell's forward step: the 3x3 perception conv to
    F*C channels, fc1 over [state | perception] ((F+1)*C inputs), fc2 to the C - frozen
    updated channels; biases, ReLU and the residual add left out. Med-NCA rule (32, 128, 2,
    1, frozen 1): 36864 + 24576 + 7936 = 69376."""
    conv = 9 * (C // groups) * nf * C * 2
    return conv + (nf + 1) * C * hidden * 2 + hidden * (C - frozen) * 2


def _throughput(flop_fwd: float, fwd_ms: float, train_ms: float, roofs: dict, dname: str,
                fire_fraction: float) -> dict:
    """Dense-equivalent GFLOP/s of the forward and of the training step, and their fractions
    of the measured roofs (the same dtype's matmul and, for float32 on CUDA, the TF32
    tensor-core matmul). Every implementation is credited the same model FLOPs: every cell,
    and a training step 3x the forward (forward and two backward products). A recomputing
    backward does ~4x, a kernel that skips idle cells about ``fire_fraction`` of it (the
    step's measured share of firing cells, recorded beside)."""
    out = {"gflops_fwd": flop_fwd / (fwd_ms * 1e-3) / 1e9, "gflops_train": 3 * flop_fwd / (train_ms * 1e-3) / 1e9,
           "fire_fraction": fire_fraction}
    for key, roof in (("roof", roofs.get(f"matmul_{dname}_gflops")),
                      ("tf32_roof", roofs.get("matmul_tf32_gflops") if dname == "float32" else None)):
        if roof:
            out[f"{key}_fraction_fwd"] = out["gflops_fwd"] / roof
            out[f"{key}_fraction_train"] = out["gflops_train"] / roof
    return out


def make_rule(C, hidden, nf, groups, frozen, device, dtype):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).to(device=device, dtype=dtype).requires_grad_(True)

    return [r(nf * C, C // groups, 3, 3), r(nf * C), r(hidden, (nf + 1) * C), r(hidden),
            r(C - frozen, hidden), r(C - frozen)]


def run(device: torch.device, dtype: torch.dtype, quick: bool, roofs: dict, log=print) -> list[Result]:
    results = []
    if device.type == "cuda":
        B, size, steps = 8, 256, 64
    else:
        B, size, steps = 1, (64 if quick else 256), (16 if quick else 64)
    # Rollouts on the CPU run at half the resolution so that the plain-autograd baseline's
    # 64-step training step stays within a few seconds.
    rsize = size if device.type == "cuda" or quick else size // 2
    configs = [
        ("mednca", dict(C=32, hidden=128, nf=2, groups=1, padding="reflect", frozen=1)),
        ("ncalab-depthwise", dict(C=16, hidden=128, nf=2, groups="C", padding="zeros", frozen=1)),
    ]
    if quick:
        configs = configs[:1]
    dname = dtype_name(dtype)
    backends = timed_backends(device, "nca_step")
    # On a GPU the reference backend stays: its backward recomputes the step in float32
    # torch ops (cuBLAS / cuDNN GEMMs and convolutions, TF32 off), unfused and on every
    # cell, a yardstick for the fused kernels at the same precision.
    for name, cfg in configs:
        C, hidden, nf = cfg["C"], cfg["hidden"], cfg["nf"]
        groups = C if cfg["groups"] == "C" else cfg["groups"]
        frozen, padding = cfg["frozen"], cfg["padding"]
        rule = make_rule(C, hidden, nf, groups, frozen, device, dtype)
        x = torch.randn(B, C, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        g = torch.randn_like(x)
        xr = x.detach()[..., :rsize, :rsize].clone().requires_grad_(True)
        gr = torch.randn_like(xr)
        cells = B * size * size
        fpc = flops_per_cell(C, hidden, nf, groups, frozen)
        label = f"{name} C={C} h={hidden} F={nf} groups={groups} {padding} B={B} {size}x{size}"
        kw = dict(groups=groups, padding=padding, update_prob=0.5, frozen_channels=frozen)

        paper = PaperStep(rule, groups, padding, 0.5, frozen)
        xl = x.detach().permute(0, 2, 3, 1).contiguous().requires_grad_(True)  # [B, H, W, C]
        gl = g.permute(0, 2, 3, 1).contiguous()
        xlr = xr.detach().permute(0, 2, 3, 1).contiguous().requires_grad_(True)
        glr = gr.permute(0, 2, 3, 1).contiguous()
        impls = [("pytorch", paper)]
        if device.type == "cuda":  # the original's per-step CPU mask draw and copy, reported apart
            impls.append(("pytorch (cpu mask)", PaperStep(rule, groups, padding, 0.5, frozen, host_mask=True)))
        if device.type == "cuda" or not quick:
            # dynamic=False: every config and dtype compiles its own static graph. Dynamo keys
            # its cache on PaperStep.forward's code, so a later config failed a size guard and
            # was recompiled with dynamic shapes: depthwise 1.7x slower than a fresh compile.
            impls.append(("pytorch+compile", torch.compile(paper, dynamic=False)))

        def timed(forward, grad_out, grad):
            """forward(), and with ``grad`` its backward from grad_out, as one callable,
            run under the row's mode_context, which the caller enters around its measurements."""
            def f():
                with torch.set_grad_enabled(grad):
                    y = forward()
                    if grad:
                        torch.autograd.backward(y, grad_out)
                return y
            return f

        def mode_context(mode):
            """The settings a row runs under. mode "tf32": torch.backends.cuda.matmul.allow_tf32
            (the user's switch from the default 3xTF32 fp32-level products to single TF32
            ones); "fp32": cuBLAS and cuDNN without TF32 (the reference backend's row);
            "no-bf16-dots fp32-dq": the Triton kernels as before 2026-11-27, under
            FASTNCA_TRITON_NCA_BF16_DOTS=0 (3xTF32 products throughout) and
            FASTNCA_TRITON_NCA_HALF_DQ=0 (the backward's dQ workspace in float32); "fp32-dq":
            the latter alone; "split-bwd": under FASTNCA_TRITON_NCA_BWD_TF32=0 (the backward's
            gradient-only products split hi + lo, as before 2026-11-27; the two rows above take
            it too); "fp32-weights": under FASTNCA_TRITON_NCA_HALF_WEIGHTS=0 (bfloat16 dots read
            the float32 weights, the default before 2026-11-28; the rows above keep the bfloat16
            copy, as scripts/nca_backward_variants.py's precisions of the same names do);
            "gemm": FASTNCA_TRITON_NCA_BWD_ACC=gemm (fc weight gradients as GEMMs over a
            workspace of the firing cells' activations; the hidden-chunk cell kernel in float32,
            on a GPU half states take the other cell kernel,
            kernels/triton/nca_step._takes_hidden_chunks); "chunked":
            FASTNCA_TRITON_NCA_BWD_ACC=chunked (that kernel, partials in its slots);
            "fwd-hchunk": FASTNCA_TRITON_NCA_FWD_HCHUNK=32 (the forward's hidden layer 32 units
            at a time). Every formulation knob is pinned (None: unset), whatever the caller
            exported. Entered once per row: inside each timed call it cost ~20 us of host
            time (7 variables and the TF32 flags, set and restored), in every eager row."""
            stack = contextlib.ExitStack()
            stack.enter_context(_tf32(True) if mode == "tf32" else _tf32(False, False) if mode == "fp32"
                                else contextlib.nullcontext())
            words = (mode or "").split()
            stack.enter_context(env(
                FASTNCA_TRITON_NCA_BF16_DOTS="0" if "no-bf16-dots" in words else None,
                FASTNCA_TRITON_NCA_HALF_DQ="0" if "fp32-dq" in words else None,
                FASTNCA_TRITON_NCA_BWD_TF32="0" if {"split-bwd", "fp32-dq"} & set(words) else None,
                FASTNCA_TRITON_NCA_HALF_WEIGHTS="0" if "fp32-weights" in words else None,
                FASTNCA_TRITON_NCA_BWD_ACC=("gemm" if "gemm" in words else "chunked" if "chunked" in words else None),
                FASTNCA_TRITON_NCA_FWD_HCHUNK="32" if "fwd-hchunk" in words else None,
                FASTNCA_TRITON_NCA_EXACT=None))
            return stack

        def paper_loop(mod, n):
            def forward():
                y = xlr
                for _ in range(n):
                    y = mod(y)
                return y
            return forward

        # (name, one-step forward, its output grad, rollout forward, its output grad, mode)
        runners = [(n, lambda m=m: m(xl), gl, paper_loop(m, steps), glr, None) for n, m in impls]
        fast = [(f"fastnca:{b}", b, "fp32" if b == "reference" else None) for b in backends]
        slow = [r for r in fast if r[1] in ("cuda", "reference")] if device.type == "cuda" else []
        fast = [r for r in fast if r not in slow]  # on a GPU the slow cuda / reference rows come last
        if "triton" in backends and device.type == "cuda":
            fast += triton_rows(dtype, common.VARIANTS)
        fast += slow
        runners += [(name,
                     lambda b=b: fastnca.nca_step(x, *rule, seed=1, step=0, backend=b, **kw), g,
                     lambda b=b: fastnca.nca_rollout(xr, *rule, steps=steps, seed=1, backend=b, **kw), gr, mode)
                    for name, b, mode in fast]
        # The same state NCHW-contiguous, a plain tensor's layout (the rows above are
        # channels_last, the models' layout): its gathers read a channel a load.
        nchw = []  # its inputs, made only where the row runs
        if "triton" in backends and device.type == "cuda":
            xn, xrn = nchw = [t.detach().contiguous().requires_grad_(True) for t in (x, xr)]
            at = next(i for i, r in enumerate(runners) if r[0] == "fastnca:triton") + 1
            runners.insert(at, ("fastnca:triton nchw",
                                lambda: fastnca.nca_step(xn, *rule, seed=1, step=0, backend="triton", **kw),
                                g.contiguous(),
                                lambda: fastnca.nca_rollout(xrn, *rule, steps=steps, seed=1, backend="triton", **kw),
                                gr.contiguous(), None))
        runners = selected(runners)
        reps = 3 if quick else 5
        rreps = 3 if quick else 5  # rollouts: seconds each on a CPU, still a median of 5 (2-3 were noisy)
        fired = fastnca.fire_mask(B, size, size, 0.5, seed=1, step=0, device=device).float().mean().item()
        rfired = sum(fastnca.fire_mask(B, rsize, rsize, 0.5, seed=1, step=i, device=device).float().mean().item()
                     for i in range(steps)) / steps
        rlabel = label.replace(f"{size}x{size}", f"{rsize}x{rsize}") + f" steps={steps}"
        for impl, step_fwd, step_g, roll_fwd, roll_g, mode in runners:
            with mode_context(mode):
                log(f"  nca_step {name} {impl} ...")
                before = tuned_now()
                try:
                    fwd = median_ms(timed(step_fwd, step_g, False), device, reps=reps)
                    fb = median_ms(timed(step_fwd, step_g, True), device, reps=reps)
                    extra = _throughput(cells * fpc, fwd, fb, roofs, dname, fired)
                    if "cpu mask" not in impl:  # the kernels alone, without the host's launch cost (a
                        # mask drawn on the host and copied over cannot be captured)
                        extra.update(graph_times(timed(step_fwd, step_g, False),
                                                 timed(step_fwd, step_g, True), device, reps))
                    extra.update(tuned_since(before))  # the forward tile the Triton autotuner picked
                    results.append(Result("nca_step", label, impl, dname, fwd, fb,
                                          saved_mb(lambda: _kept(step_fwd)),
                                          peak_mb(timed(step_fwd, step_g, True), device, cpu=True), extra=extra))
                except Exception as e:  # a failing implementation is reported, not fatal
                    results.append(Result("nca_step", label, impl, dname, note=f"error: {type(e).__name__}: {e}"[:120]))
                release(device)
                try:
                    rfwd = median_ms(timed(roll_fwd, roll_g, False), device, reps=rreps, warmup=1)
                    rfb = median_ms(timed(roll_fwd, roll_g, True), device, reps=rreps, warmup=1)
                    rpeak = peak_mb(timed(roll_fwd, roll_g, True), device, cpu=True)
                    rextra = _throughput(B * rsize * rsize * fpc * steps, rfwd, rfb, roofs, dname, rfired)
                    if rpeak is not None:  # with the state, its gradient and the output gradient, which
                        # every implementation holds too (peak_mb leaves out what existed before)
                        rextra["peak_with_inputs_mb"] = rpeak + 3 * xr.nbytes / 2**20
                    results.append(Result("nca_rollout", rlabel, impl, dname, rfwd, rfb,
                                          saved_mb(lambda: _kept(roll_fwd)), rpeak, extra=rextra))
                except Exception as e:
                    note = f"error: {type(e).__name__}: {e}"[:120]
                    results.append(Result("nca_rollout", rlabel, impl, dname, note=note))
                for t in (x, xl, xr, xlr, *nchw, *rule):
                    t.grad = None
                release(device)
        if device.type == "cuda" and name == "mednca":
            results += _full_resolution_peak(impls[0][1], rule, C, kw, steps, label, dname, backends, device, log)
    return results


def triton_rows(dtype: torch.dtype, variants: bool) -> list[tuple[str, str, str]]:
    """The Triton rows a GPU run adds after fastnca:triton itself, (name, backend, mode): the
    user's TF32 switch, then with ``variants`` (fastnca bench --variants) variant_rows."""
    return [("fastnca:triton tf32", "triton", "tf32")] + (variant_rows(dtype) if variants else [])


def variant_rows(dtype: torch.dtype) -> list[tuple[str, str, str]]:
    """The rows ``fastnca bench --variants`` adds on a GPU, (name, backend, mode), most
    wanted first (a time-limited run keeps the rows it reached): the opt-in Triton
    formulations, then the older defaults. They decide defaults; users' runs leave them out."""
    bf16 = dtype == torch.bfloat16
    rows = [("fastnca:triton fwd-hchunk", "triton", "fwd-hchunk"),  # opt-in: the forward in hidden chunks
            ("fastnca:triton chunked", "triton", "chunked"),  # opt-in: hidden chunks, partials in slots
            ("fastnca:triton gemm", "triton", "gemm")]  # opt-in: weight grads as GEMMs
    if bf16:
        rows += [("fastnca:triton split-bwd", "triton", "split-bwd"),  # the products before 2026-11-27
                 ("fastnca:triton fp32-weights", "triton", "fp32-weights"),  # the default before 2026-11-28
                 ("fastnca:triton fp32-dq", "triton", "fp32-dq"),  # the defaults before 2026-11-27
                 ("fastnca:triton no-bf16-dots fp32-dq", "triton", "no-bf16-dots fp32-dq")]
    return rows


def _full_resolution_peak(paper, rule, C, kw, steps, label, dname, backends, device, log) -> list[Result]:
    """Peak CUDA memory of one 64-step rollout training step at 1024x1024, B=1, against
    4 GB: peak_mb adds the state and its output gradient (allocated before the measure).
    No rows under --warm-only: a peak needs no warm compile caches, and the eager row alone
    allocates ~38 GB (a warm-up took its peaks as None and failed on them)."""
    results = []
    if common.WARM_ONLY:
        return results
    dtype = rule[0].dtype
    big = torch.randn(1, C, 1024, 1024, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    big.requires_grad_(True)
    gbig = torch.randn_like(big)
    bigl = big.detach().permute(0, 2, 3, 1).contiguous().requires_grad_(True)
    gbigl = gbig.permute(0, 2, 3, 1).contiguous()
    config = label.split(" B=")[0] + f" B=1 1024x1024 steps={steps}: training-step peak memory"

    def paper_rollout():
        y = bigl
        for _ in range(steps):
            y = paper(y)
        torch.autograd.backward(y, gbigl)

    runs = [("pytorch", paper_rollout)]
    runs += [(f"fastnca:{b}", lambda b=b: torch.autograd.backward(
        fastnca.nca_rollout(big, *rule, steps=steps, seed=1, backend=b, **kw), gbig)) for b in backends]
    runs = selected(runs)  # --impls narrows these rows too
    inputs_mb = 2 * big.nbytes / 2**20
    for impl, fn in runs:
        log(f"  nca_rollout 1024x1024 peak {impl} ...")
        try:
            peak = peak_mb(fn, device) + inputs_mb
            results.append(Result("nca_rollout_peak", config, impl, dname, peak_mb=peak,
                                  note="under 4 GB" if peak < 4096 else "over 4 GB",
                                  extra={"includes_state_and_grad_mb": inputs_mb}))
        except Exception as e:
            results.append(Result("nca_rollout_peak", config, impl, dname,
                                  note=f"error: {type(e).__name__}: {e}"[:120]))
        big.grad = None
        bigl.grad = None
        for t in rule:
            t.grad = None
        release(device)
    return results
