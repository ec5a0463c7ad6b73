"""Small driver for compute-sanitizer (scripts/sanitize_cuda.sh): every CUDA kernel of
fastnca (or, with --backend triton, every Triton kernel), forward and backward, on small odd shapes that hit the borders, the partial
tiles and every code path (groups 1 / C, paddings, borders, kernel sizes, head dims,
dtypes, strided views). Checks the results against the reference loosely, so a run that
the sanitizer passes is also a run that computed the right thing.
Usage: python scripts/cuda_sanitize_driver.py [--quick] [--backend cuda|triton]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

import torch  # noqa: E402

import importlib  # noqa: E402

from fastnca.benchmark.common import env  # noqa: E402
from fastnca.kernels.reference import nca_step as ref_nca  # noqa: E402
from fastnca.kernels.reference import neighborhood_attention as ref_na  # noqa: E402


def rel(a, b):
    s = b.double().abs().max().item()
    d = (a.double() - b.double()).abs().max().item()
    return d / s if s > 0 else d


def nca(dev, B, C, H, W, F, hidden, groups, padding, frozen, p, dtype, layout):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.4).to(dev)  # noqa: E731
    if layout == "strided":
        x = r(B, C + 2, H + 1, 2 * W).to(dtype)[:, 1:1 + C, 1:, ::2]
    else:
        x = r(B, C, H, W).to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    gr = C if groups == "C" else 1
    weights = (r(F * C, C // gr, 3, 3), r(F * C), r(hidden, (F + 1) * C), r(hidden), r(C - frozen, hidden),
               r(C - frozen))
    args = (*weights, gr, padding, p, 7, 3, frozen)
    out = cuda_nca.forward(x, *args)
    grads = cuda_nca.backward(torch.ones_like(x), x, *args)
    torch.cuda.synchronize()
    # The reference runs on CPU copies: only fastnca's kernels run under the sanitizer.
    xc, argc = x.cpu(), (*(w.cpu() for w in weights), *args[6:])
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    errs = [rel(out.cpu(), ref_nca.forward(xc, *argc))]
    errs += [rel(a.cpu(), b) for a, b in zip(grads, ref_nca.backward(torch.ones_like(xc), xc, *argc))]
    assert max(errs) < tol, (B, C, H, W, F, hidden, groups, padding, frozen, p, dtype, layout, errs)


def attention(dev, B, H, W, nh, D, ks, border, dtype, packed, dlse):
    g = torch.Generator().manual_seed(1)
    if packed:
        q, k, v = torch.randn(B, H, W, 3, nh, D, generator=g).to(dtype).to(dev).unbind(3)
    else:
        q, k, v = (torch.randn(B, H, W, nh, D, generator=g).to(dtype).to(dev) for _ in range(3))
    o, lse = cuda_na.forward(q, k, v, ks, border, D ** -0.5)
    do = torch.randn(B, H, W, D, nh, generator=g).to(dtype).to(dev).transpose(-1, -2)
    gl = torch.randn(B, H, W, nh, generator=g).to(dev) if dlse else None
    grads = cuda_na.backward(do, gl, q, k, v, o, lse, ks, border, D ** -0.5)
    torch.cuda.synchronize()
    qc, kc, vc, doc = (t.cpu() for t in (q, k, v, do))
    glc = None if gl is None else gl.cpu()
    ro, rl = ref_na.forward(qc, kc, vc, ks, border, D ** -0.5)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    errs = [rel(o.cpu(), ro), rel(lse.cpu(), rl)]
    errs += [rel(a.cpu(), b) for a, b in zip(grads, ref_na.backward(doc, glc, qc, kc, vc, ro, rl, ks, border, D ** -0.5))]
    assert max(errs) < tol, (B, H, W, nh, D, ks, border, dtype, packed, dlse, errs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases (racecheck is slow)")
    ap.add_argument("--backend", default="cuda", choices=["cuda", "triton"],
                    help="whose kernels run under the sanitizer (triton: its compiled GPU kernels; "
                         "memcheck also sees their shared-memory accesses)")
    args = ap.parse_args()
    global cuda_fm, cuda_nca, cuda_na
    cuda_fm, cuda_nca, cuda_na = (importlib.import_module(f"fastnca.kernels.{args.backend}.{m}")
                                  for m in ("fire_mask", "nca_step", "neighborhood_attention"))
    dev = torch.device("cuda")
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    cuda_fm.fire_mask(2, 3, 5, 0.5, 1, 2, dev)
    nca_cases = [
        (1, 3, 2, 3, 1, 5, 1, "reflect", 0, 0.5, f32, "nchw"),
        (2, 4, 3, 5, 2, 33, "C", "zeros", 1, 1.0, f16, "channels_last"),
        (1, 5, 5, 3, 3, 16, 1, "circular", 3, 0.5, bf16, "strided"),
        (1, 35, 3, 7, 2, 40, 1, "replicate", 2, 0.5, f32, "nchw"),
        (1, 16, 17, 31, 2, 128, 1, "reflect", 1, 0.5, f32, "channels_last"),  # C <= 16, hidden 128:
        # the rule whose 8-warp Triton backward tiles ran N=8 wgmmas (see _wgmma_safe)
        (1, 16, 7, 9, 2, 64, "C", "reflect", 0, 0.0, f32, "nchw"),
        (1, 128, 3, 5, 2, 256, 1, "zeros", 1, 1.0, f32, "nchw"),
    ]
    na_cases = [
        (1, 2, 2, 1, 1, 3, "zeros", f32, False, True),
        (1, 3, 5, 2, 5, 3, "mask", f16, True, False),
        (2, 4, 3, 1, 33, 5, "circular", bf16, True, True),
        (1, 7, 8, 2, 16, 7, "shift", f32, False, True),
        (1, 5, 7, 6, 64, 3, "zeros", f32, True, True),
        (1, 3, 3, 1, 130, 3, "mask", f32, False, True),
    ]
    if args.quick:
        nca_cases, na_cases = nca_cases[:4], na_cases[:4]
    for c in nca_cases:
        nca(dev, *c)
    for c in na_cases:
        attention(dev, *c)
    # Triton's opt-in attention formulations (their knobs are read at each call): the halo
    # kernels and the split window backward, whose pds workspace is read through masks
    formulations = {"halo": dict(FASTNCA_TRITON_NA_FORWARD="halo", FASTNCA_TRITON_NA_BACKWARD="halo"),
                    "split": dict(FASTNCA_TRITON_NA_BACKWARD="split")} if args.backend == "triton" else {}
    for knobs in formulations.values():
        with env(**knobs):
            for c in na_cases:
                attention(dev, *c)
    print(f"cuda_sanitize_driver ({args.backend}): {len(nca_cases)} nca_step and {len(na_cases)} attention cases"
          f"{f' (also as {len(formulations)} opt-in formulations)' if formulations else ''} OK")


if __name__ == "__main__":
    main()
