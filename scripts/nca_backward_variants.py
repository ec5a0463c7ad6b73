"""Time the nca_step backward kernels alone on a GPU, per variant, for choosing defaults:
the Triton backward's tile (FASTNCA_TRITON_NCA_BWD_TILE) and dot precision (3xTF32, or
TF32 under torch.backends.cuda.matmul.allow_tf32), beside the CUDA backward.

Med-NCA rule (C=32, hidden 128, F=2, reflect, frozen 1) unless --rule says otherwise;
B=8, 256x256 bfloat16 state by default. Each variant: CUDA-event median of back-to-back
calls of backend.backward (the kernels and the launcher, no autograd), and the largest
difference of its gradients from the first variant's. A variant that fails is reported.

Usage: python scripts/nca_backward_variants.py [--rule C,hidden,F,groups,frozen]
           [--shape B,H,W] [--dtype bfloat16] [--tiles 64,8 32,4 16,4 ...] [--device cuda]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

import torch  # noqa: E402

from fastnca import _backend  # noqa: E402
from fastnca.benchmark.common import median_ms  # noqa: E402
from fastnca.benchmark.nca_step import make_rule  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rule", default="32,128,2,1,1", help="C,hidden,F,groups,frozen")
    ap.add_argument("--shape", default="8,256,256", help="B,H,W")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test under TRITON_INTERPRET=1")
    ap.add_argument("--tiles", nargs="*", default=["64,8", "64,4", "32,4", "16,4"],
                    help="Triton backward tiles BLOCK_M,WARPS ('' = the default choice)")
    a = ap.parse_args()
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

    variants = [("cuda", "cuda", None, False)] if _backend._usable_on("cuda", dev) is True else []
    for t in a.tiles:
        variants.append((f"triton tile={t or 'default'} 3xTF32", "triton", t, False))
        variants.append((f"triton tile={t or 'default'} TF32", "triton", t, True))
    first = None
    print(f"nca_step backward, rule C={C} hidden={hidden} F={F} groups={groups} frozen={frozen}, "
          f"{a.dtype} state [{B}, {C}, {H}, {W}], "
          f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}")
    for name, backend, tile, tf32 in variants:
        kern = _backend.kernel(backend, "nca_step")
        if tile:
            os.environ["FASTNCA_TRITON_NCA_BWD_TILE"] = tile
        else:
            os.environ.pop("FASTNCA_TRITON_NCA_BWD_TILE", None)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            grads = kern.backward(gout, x, *args)
            ms = median_ms(lambda: kern.backward(gout, x, *args), dev, reps=7)
        except Exception as e:  # a variant that does not compile or fit is reported
            print(f"  {name:<34} failed: {type(e).__name__}: {str(e)[:100]}")
            continue
        if first is None:
            first = grads
        diff = max(float((u.float() - v.float()).abs().max() / v.float().abs().max().clamp_min(1e-30))
                   for u, v in zip(grads, first))
        print(f"  {name:<34} {ms:8.3f} ms   max rel. diff vs first {diff:.2e}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    return 0


if __name__ == "__main__":
    sys.exit(main())
