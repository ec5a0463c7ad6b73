"""Compile fastnca's Triton nca_step kernels for sm_90 on a machine without a GPU and print,
per kernel, the tile, shared memory, registers, spill stack and the MMA instruction shapes.

A stand-in driver reports an sm_90 target and every launch becomes a compile-only warm-up,
so the launchers pick their tiles exactly as on an H100 (FASTNCA_TRITON_AUTOTUNE=0 tiles
for the forward). Registers and stack come from `cuobjdump --dump-resource-usage` on the
cubin (Triton ships cuobjdump in triton/backends/nvidia/bin). Flags an N=8 wgmma
(triton-lang/triton#10629) and wgmma layouts with more warp groups than 64-row blocks
(split over N or repeating rows; see _wgmma_safe in kernels/triton/nca_step.py).

Usage: [DOT_PREC=tf32] [DUMP_DIR=dir] [LAYOUT=channels_last] [WALK=listed] python scripts/triton_sm90_resources.py B,C,H,W,hidden,F,groups,frozen[,dtype] ...
       (groups: 1 or C; dtype of state and weights, default float32), e.g.
       8,32,64,64,128,2,1,1,bfloat16 for the Med-NCA rule in bf16 (FASTNCA_TRITON_NCA_EXACT=0:
       tf32x3 for every product, as before the half-operand products of _mm);
       na:B,H,W,heads,D,kernel_size,border,dtype for the attention kernels (default tiles;
       FASTNCA_TRITON_NA_FORWARD=halo for the tensor-core forward), e.g.
       na:32,32,32,12,64,3,zeros,bfloat16 for GeCA-S.
Seen with triton 3.9 (2026-11-26): the Med-NCA rule's backward cell kernel (64 rows,
8 warps) used 255 registers + 2256 bytes of stack, 128 KB of shared memory.
SASS:N is the kernel's static instruction count; for the unrolled k=3 attention kernels
that is what a thread runs (triton 3.6, 2026-11-27: GeCA-S bf16 forward 1232, backward
1712, from 1752 and 2112).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ["FASTNCA_TRITON_AUTOTUNE"] = "0"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.jit as jit  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class _Sm90:
    """Just enough of a driver for JITFunction.run to compile for sm_90."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


driver.set_active(_Sm90())
_compiled: list = []
_run = jit.JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    _compiled.append((self.fn.__name__, kwargs.get("BLOCK_M"), kwargs.get("num_warps"), kernel))
    return kernel


jit.JITFunction.run = _compile_only

from fastnca.kernels.triton import nca_step as tri  # noqa: E402
from fastnca.kernels.triton import neighborhood_attention as tri_na  # noqa: E402
from fastnca.kernels.triton import _runtime  # noqa: E402

tri._device_limits = lambda device: (132, 227 * 1024)  # H100: SMs, opt-in shared memory
tri.on_device = tri_na.on_device = lambda device: contextlib.nullcontext()
# DOT_PREC=tf32 shows what torch.backends.cuda.matmul.allow_tf32 = True compiles to.
_PREC = os.environ.get("DOT_PREC") or ("tf32x3" if _runtime._TF32X3 else "ieee")
tri._dot_precision = lambda device: _PREC
if os.environ.get("WALK") == "listed":  # the large states' kernels (listed firing cells) on any size
    tri._COMPACT_BACKWARD_CELLS = tri._COMPACT_FORWARD_CELLS = 1
tri_na.autotuning = lambda: False  # the default tiles
torch.cuda.get_device_capability = lambda device=None: (9, 0)

_CUOBJDUMP = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                                        "bin", "cuobjdump")


def _resources(cubin: bytes) -> str:
    """Registers and stack (cuobjdump --dump-resource-usage) and the SASS instruction count
    (instructions a thread of one program runs, where the kernel has no loops)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
    instr = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, re.M))
    return " ".join(line.strip().split(" SHARED")[0] for line in out.splitlines() if "REG:" in line) + f" SASS:{instr}"


def _mma_summary(ttgir: str) -> str:
    """The MMA instruction shapes of a kernel, flagging N=8 wgmmas and wgmma dots with more
    warp groups than 64-row blocks."""
    mma = sorted(set(re.findall(r"nvidia_mma<\{versionMajor = (\d)[^}]*instrShape = \[([0-9, ]*)\]", ttgir)))
    n8 = any(v == "3" and shape.split(", ")[1] == "8" for v, shape in mma)
    # wgmma dots with more warp groups than 64-row blocks (see _wgmma_safe)
    warps_of = {name: (int(wm), int(wn)) for name, wm, wn in re.findall(
        r"^#(\w+) = #ttg\.nvidia_mma<\{versionMajor = 3[^}]*warpsPerCTA = \[(\d+), (\d+)\]", ttgir, re.M)}
    spread = sorted({f"{m}x{n}@{warps_of[lay]}" for m, n, lay in re.findall(
        r"ttng\.warp_group_dot .*-> tensor<(\d+)x(\d+)xf32, #(\w+)>", ttgir)
        if lay in warps_of and warps_of[lay][0] * warps_of[lay][1] * 16 > int(m)})
    return (f"mma={['v%s[%s]' % m for m in mma]}{'  N=8 WGMMA' if n8 else ''}"
            f"{'  WARP GROUPS SPREAD ' + ' '.join(spread) if spread else ''}")


def _dump(name, kernel) -> None:
    """With DUMP_DIR set, write the kernel's TTGIR, PTX and cubin there (NAME.ttgir, ...)."""
    out = os.environ.get("DUMP_DIR")
    if out:
        os.makedirs(out, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(out, f"{name}.{ext}"), "w") as f:
                f.write(kernel.asm[ext])
        with open(os.path.join(out, f"{name}.cubin"), "wb") as f:
            f.write(kernel.asm["cubin"])


def report(B, C, H, W, hidden, F, groups, frozen, dtype="float32") -> None:
    g = C if groups == "C" else int(groups)
    dt = getattr(torch, dtype)
    x = torch.randn(B, C, H, W, dtype=dt)
    if os.environ.get("LAYOUT") == "channels_last":  # the benchmark's layout: channel loads vectorise
        x = x.contiguous(memory_format=torch.channels_last)
    w = tuple(t.to(dt) for t in (torch.randn(F * C, C // g, 3, 3), torch.randn(F * C),
                                 torch.randn(hidden, (F + 1) * C), torch.randn(hidden),
                                 torch.randn(C - frozen, hidden), torch.randn(C - frozen)))
    _compiled.clear()
    tri.forward(x, *w, g, "reflect", 0.5, 1, 2, frozen)
    tri.backward(torch.randn_like(x), x, *w, g, "reflect", 0.5, 1, 2, frozen)
    seen = set()
    for name, block_m, warps, kernel in _compiled:
        if "arrange" in name or (name, block_m, warps) in seen:  # batch chunks repeat the same kernels
            continue
        seen.add((name, block_m, warps))
        _dump(name, kernel)
        print(f"C={C} hidden={hidden} F={F} groups={groups} {dtype}  {name}: BLOCK_M={block_m} warps={warps} "
              f"shared={kernel.metadata.shared // 1024} KB {_resources(kernel.asm['cubin'])} "
              f"{_mma_summary(kernel.asm['ttgir'])}", flush=True)


def report_attention(B, H, W, heads, D, ks, border, dtype) -> None:
    q, k, v = (torch.randn(B, H, W, heads, D, dtype=getattr(torch, dtype)) for _ in range(3))
    _compiled.clear()
    o, lse = tri_na.forward(q, k, v, ks, border, D ** -0.5)
    tri_na.backward(torch.randn_like(o), None, q, k, v, o, lse, ks, border, D ** -0.5)
    for name, _, warps, kernel in _compiled:
        _dump(name, kernel)
        print(f"attention [{B}, {H}, {W}, {heads}, {D}] k={ks} {border} {dtype}  {name}: warps={warps} "
              f"shared={kernel.metadata.shared // 1024} KB {_resources(kernel.asm['cubin'])} "
              f"{_mma_summary(kernel.asm['ttgir'])}", flush=True)


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    for spec in sys.argv[1:]:
        if spec.startswith("na:"):
            B, H, W, heads, D, ks, border, dtype = spec[3:].split(",")
            report_attention(int(B), int(H), int(W), int(heads), int(D), int(ks), border, dtype)
            continue
        B, C, H, W, hidden, F, groups, frozen, *dtype = spec.split(",")
        report(int(B), int(C), int(H), int(W), int(hidden), int(F), groups, int(frozen), *dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
