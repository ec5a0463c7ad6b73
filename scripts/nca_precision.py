"""How accurate is each way of computing a bfloat16 NCA step? A CPU study for choosing the
GPU kernels' dot precision (DESIGN.md: half inputs compute in float32 inside).

For a bfloat16 state and weights (the Med-NCA rule unless --rule says otherwise), the step
and its backward are computed four ways, each against a float64 ground truth from the
same bfloat16 inputs and the same fire mask:
  fp32   every product in float32: what fastnca's kernels do by default in the forward
         (3xTF32 on tensor cores has float32-level error; for bfloat16 rules the Triton
         backward's gradient-only products take one TF32 product by default,
         FASTNCA_TRITON_NCA_BWD_TF32, which this study does not model);
  tf32   every dot's operands rounded to TF32 (10-bit mantissa, round to nearest even),
         products summed exactly: fastnca's Triton kernels under
         torch.backends.cuda.matmul.allow_tf32 = True;
  bf16   bfloat16 operands AND a bfloat16 result after every op (conv, linear, relu, ...),
         as eager PyTorch runs the papers' code on a bfloat16 model (autograd);
and, with --steps S > 1, through an S-step rollout (the error compounds).
Reported per tensor: max-norm and 2-norm relative error, ||a - ref|| / ||ref||.

Usage: python scripts/nca_precision.py [--rule C,hidden,F,frozen] [--shape B,H,W]
           [--steps 1] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastnca import fire_mask  # noqa: E402

NAMES = ("out", "d_state", "d_pw", "d_pb", "d_w1", "d_b1", "d_w2", "d_b2")


def tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to TF32 (10 explicit mantissa bits), round to nearest even."""
    b = t.float().contiguous().view(torch.int32)
    lsb = (b >> 13) & 1
    return ((b + 0xFFF + lsb) & ~0x1FFF).view(torch.float32)


class _Dot(torch.autograd.Function):
    """a @ b with both operands rounded by `rnd` in forward AND in the two backward products
    (as a kernel that runs every dot at that precision), summed in float64."""

    @staticmethod
    def forward(ctx, a, b, rnd):
        ctx.save_for_backward(a, b)
        ctx.rnd = rnd
        return rnd(a).double() @ rnd(b).double()

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        r = ctx.rnd
        return (r(g).double() @ r(b).double().T, r(a).double().T @ r(g).double(), None)


def _step_rows(x, pw, pb, w1, b1, w2, b2, m, frozen, rnd):
    """One step with every dot through _Dot(rnd); x [B, C, H, W] float64, reflect padding."""
    B, C, H, W = x.shape
    cols = F.unfold(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3)  # [B, C*9, H*W]
    cols = cols.transpose(1, 2).reshape(B * H * W, C * 9)
    conv = _Dot.apply(cols, pw.reshape(pw.shape[0], -1).T, rnd) + pb
    xr = x.permute(0, 2, 3, 1).reshape(B * H * W, C)
    p = torch.cat([xr, conv], 1)
    h = torch.relu(_Dot.apply(p, w1.T, rnd) + b1)
    delta = _Dot.apply(h, w2.T, rnd) + b2
    mr = m.reshape(B * H * W, 1)
    new = torch.cat([xr[:, :frozen], xr[:, frozen:] + mr * delta], 1)
    return new.reshape(B, H, W, C).permute(0, 3, 1, 2)


def _step_bf16(x, pw, pb, w1, b1, w2, b2, m, frozen):
    """The same step in eager bfloat16 (every op's result rounded to bfloat16)."""
    conv = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), pw, pb)
    p = torch.cat([x, conv], 1).permute(0, 2, 3, 1)
    delta = F.linear(torch.relu(F.linear(p, w1, b1)), w2, b2).permute(0, 3, 1, 2)
    return torch.cat([x[:, :frozen], x[:, frozen:] + m[:, None] * delta], 1)


def run(mode, state, weights, grad_out, masks, frozen):
    """(out, d_state, *d_weights) of a len(masks)-step rollout computed in `mode`."""
    if mode == "bf16":
        leaves = [t.detach().to(torch.bfloat16).requires_grad_() for t in (state, *weights)]
        y = leaves[0]
        for m in masks:
            y = _step_bf16(y, *leaves[1:], m.to(torch.bfloat16), frozen)
        y.backward(grad_out.to(torch.bfloat16))
        return (y.detach(), *(t.grad for t in leaves))
    rnd = {"fp64": lambda t: t.double(), "fp32": lambda t: t.float(), "tf32": tf32}[mode]
    leaves = [t.detach().double().requires_grad_() for t in (state, *weights)]
    y = leaves[0]
    for m in masks:
        y = _step_rows(y, *leaves[1:], m.double(), frozen, rnd)
        if mode != "fp64":
            y = y.float().double()  # the kernels store each step's state (here: in float32)
    y.backward(grad_out.double())
    return (y.detach(), *(t.grad for t in leaves))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rule", default="32,128,2,1", help="C,hidden,F,frozen (dense perception, reflect)")
    ap.add_argument("--shape", default="1,64,64", help="B,H,W")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    C, hid, nf, frozen = (int(t) for t in a.rule.split(","))
    B, H, W = (int(t) for t in a.shape.split(","))
    g = torch.Generator().manual_seed(a.seed)

    def r(*shape, s=0.1):  # bfloat16-representable inputs, as a bfloat16 model has them
        return (torch.randn(*shape, generator=g) * s).to(torch.bfloat16).double()

    state, grad_out = r(B, C, H, W, s=1.0), r(B, C, H, W, s=1.0)
    weights = (r(nf * C, C, 3, 3), r(nf * C), r(hid, (nf + 1) * C), r(hid), r(C - frozen, hid), r(C - frozen))
    masks = [fire_mask(B, H, W, 0.5, 1234, s).double() for s in range(a.steps)]
    truth = run("fp64", state, weights, grad_out, masks, frozen)
    print(f"rule C={C} hidden={hid} F={nf} frozen={frozen}, bfloat16 inputs [{B}, {C}, {H}, {W}], "
          f"{a.steps} step(s); relative error vs float64: max-norm / 2-norm")
    print(f"  {'':6}" + "".join(f"{n:>20}" for n in NAMES))
    for mode in ("fp32", "tf32", "bf16"):
        got = run(mode, state, weights, grad_out, masks, frozen)
        cells = []
        for u, v in zip(got, truth):
            d = u.double() - v
            cells.append(f"{float(d.abs().max() / v.abs().max()):.1e} / {float(d.norm() / v.norm()):.1e}")
        print(f"  {mode:6}" + "".join(f"{c:>20}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
