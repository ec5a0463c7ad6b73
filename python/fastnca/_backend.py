"""Which backends are usable here, and which one runs a call.

``backends()`` reports availability; ``resolve()`` turns the user's ``backend=`` argument
(or ``FASTNCA_BACKEND``) into a concrete backend name for an op and a device, with an
error that says why when the request cannot be honoured.
"""
from __future__ import annotations

import importlib
import functools
import importlib.metadata
import importlib.util
import os

import torch

from . import _checks, _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")
OPS = ("fire_mask", "nca_step", "neighborhood_attention")

# Auto-selection order per device type, and per op where it differs. The Triton
# interpreter is a correctness tool, never auto-selected on CPU. On CUDA, the H100 runs of
# 2026-11-26 (bf16; benchmarks/README.md) decide for Triton on both ops:
# - nca_step: Triton's forward took 1.09 ms against 1.82 ms on `cuda` (Med-NCA rule, B=8,
#   256x256; h100-55af573-nca-bf16.json); after the backward rework of c849cdb, Triton's
#   backward kernels took 7.3 ms against 9.4 ms for the CUDA ones (benchmarks/README.md,
#   scripts/nca_backward_variants.py; the old Triton tile measured 12.7 ms in both runs).
# - neighborhood_attention: Triton's kernels took 0.28 / 1.40 ms (fwd / fwd+bwd, GeCA-S)
#   against 1.42 / 6.04 ms for the CUDA ones (h100-55af573-attention-bf16.json).
# fire_mask keeps the CUDA kernel first.
_AUTO = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
    ("cuda", "nca_step"): ("triton", "cuda", "reference"),
    ("cuda", "neighborhood_attention"): ("triton", "cuda", "reference"),
}


def _triton_interpret() -> bool:
    """TRITON_INTERPRET as the installed Triton reads it when it decorates kernels (without
    importing Triton): 1, true, on, yes or y in any case from Triton 3.4 (its knobs' C++
    getenv_bool, checked on 3.6 and 3.9), exactly "1" before.
    kernels.triton._runtime.interpreting() is the decorated kernels' own answer."""
    value = os.environ.get("TRITON_INTERPRET", "0")
    if _triton_version() >= (3, 4):
        return value.lower() in ("1", "true", "on", "yes", "y")
    return value == "1"


@functools.lru_cache(maxsize=None)
def _version(dist: str) -> tuple[int, int]:
    """(major, minor) of an installed distribution, (0, 0) without it; read once (the package
    metadata parse took ~40 us, on every call on a CPU device)."""
    try:
        return tuple(int(p) for p in importlib.metadata.version(dist).split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0, 0)


def _triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton (without importing it), (0, 0) without one."""
    return _version("triton")


def _interpreter_problem() -> str | None:
    """Why the installed Triton's interpreter cannot run these kernels, or None: before 3.4
    it fails on them (3.0/3.1: constexpr arguments; 3.2/3.3: the nca backward), and before
    3.7 it fails with numpy >= 2.4 (int() of a 1-element array)."""
    triton, numpy = _triton_version(), _version("numpy")
    if numpy == (0, 0):
        return "Triton's interpreter needs numpy (pip install numpy)"
    if triton < (3, 4) or (numpy >= (2, 4) and triton < (3, 7)):
        return (f"Triton {'.'.join(map(str, triton))}'s interpreter cannot run fastnca's kernels with numpy "
                f"{'.'.join(map(str, numpy))}: it needs triton >= 3.4 (>= 3.7 with numpy >= 2.4)")
    return None


def _availability(name: str) -> bool | str:
    if name == "reference":
        return True
    if name == "cpu":
        return _ext.error("_C") or True
    if name == "cuda":
        if _ext.load("_C_cuda") is None:
            return "fastnca._C_cuda was not built (no CUDA toolkit at build time, or FASTNCA_CUDA=off)"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return True
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return 'triton not installed (pip install "fastnca[triton]")'
        if not torch.cuda.is_available() and not _triton_interpret():
            return "no CUDA device (set TRITON_INTERPRET=1 before import to run Triton on CPU tensors)"
        if not torch.cuda.is_available():
            return _interpreter_problem() or True
        return True
    raise ValueError(f"unknown backend {name!r}")


# Settled once at import (as DESIGN.md says: TRITON_INTERPRET must be set before import),
# so that resolve() is plain dict lookups when torch.compile traces a call.
_STATUS = {name: _availability(name) for name in BACKENDS}
_INTERPRET = _triton_interpret()  # TRITON_INTERPRET at import: what the kernels were decorated with
_KERNELS = {(b, op): importlib.util.find_spec(f"fastnca.kernels.{b}.{op}") is not None
            for b in BACKENDS for op in OPS}


def backends() -> dict[str, bool | str]:
    """Backend name -> True when usable here, else a string saying why not."""
    return dict(_STATUS)


def has_kernel(backend: str, op: str) -> bool:
    return _KERNELS[(backend, op)]


def kernel(backend: str, op: str):
    """The module ``fastnca.kernels.<backend>.<op>`` holding the op's kernels."""
    return importlib.import_module(f"fastnca.kernels.{backend}.{op}")


def _usable_on(backend: str, device: torch.device) -> bool | str:
    status = _STATUS[backend]
    if status is not True:
        return status
    if backend == "cpu" and device.type != "cpu":
        return f"backend 'cpu' runs on CPU tensors, got {device.type} tensors"
    if backend == "cuda" and device.type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors, got {device.type} tensors"
    if backend == "triton" and device.type == "cpu" and not _INTERPRET:
        return "backend 'triton' runs on CPU tensors only under TRITON_INTERPRET=1"
    if backend == "triton" and device.type not in ("cpu", "cuda"):
        return f"backend 'triton' runs on CUDA tensors, got {device.type} tensors"
    return True


# Storage dtypes each backend's kernels take (float64 only on the CPU and the reference).
_DTYPES = {"reference": _checks.COMPUTE_DTYPES, "cpu": _checks.COMPUTE_DTYPES,
           "cuda": _checks.FLOAT_DTYPES, "triton": _checks.FLOAT_DTYPES}


# Sizes past which a backend's nca_step kernels refuse a rule or state (the reference takes
# any): the kernels check against these, and backend=None passes over a backend they rule out.
NCA_LIMITS = {
    "cpu": {"channels": 65536, "filters": 64, "hidden": 65536, "side": (1 << 30) - 1},
    "cuda": {"depthwise_filters": 25, "hidden": 65536},  # and shared memory: _cuda_nca_refusal
    # cells: tile positions (int32) run a tile past the last cell. channels, filters, hidden:
    # the rules the kernels are built and GPU-tested for; the largest (C=128, F=3, hidden
    # 256) takes 164 KB of shared memory a block (sm_90), and larger tiles pass Triton's
    # 2^20-element block limit (hidden > 32768 at 32 rows) or a block's shared memory first.
    "triton": {"channels": 128, "filters": 3, "hidden": 256, "cells": 2**31 - 1024},
}


def _over(size, limit, grid: bool = False) -> bool:
    """size > limit where that is known without a guard: a symbolic size (torch.compile with
    dynamic shapes, torch.export) is not specialised against the limit (export refuses the
    guard on an unbounded dim); the kernels check such sizes again when they run. ``grid``:
    a batch, grid or attention size, which compile may make symbolic, is not checked under
    compile at all: dynamo of torch 2.4-2.7 (at least) passes a symbolic size off as an int,
    to type() and isinstance alike, so the check would add the guard. (The rule's sizes
    come from the weights, whose shapes dynamo keeps static.)"""
    if limit is None:
        return False
    if grid and torch.compiler.is_compiling():
        return False
    if type(size) is int:
        return size > limit
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true
    except ImportError:  # pragma: no cover - very old torch: leave it to the kernels
        return False
    return statically_known_true(size > limit)


def _cuda_smem_limit(index: int | None) -> int | None:
    """The opt-in shared memory of one block on CUDA device ``index`` (None: the current
    one), in bytes: torch's device property where it has one (torch >= 2.7), else the CUDA
    module's query of the same attribute; None without either."""
    index = torch.cuda.current_device() if index is None else index
    limit = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    mod = _ext.load("_C_cuda")
    if limit is None and mod is not None:
        with torch.cuda.device(index):
            limit = mod.device_smem_optin()
    return limit


_CUDA_REFUSALS: dict = {}


def _cuda_nca_refusal(index: int | None, C: int, F: int, hidden: int, frozen: int, depthwise: bool,
                      grad: bool) -> str | None:
    """Why the CUDA nca kernels cannot run this rule on device ``index`` -- its shared memory
    (the backward's main kernel keeps about 2(F+1)C + C rows of 33 floats) or, with ``grad``,
    the backward's index arithmetic -- or None. Eager calls only (see nca_unsupported)."""
    key = (index, C, F, hidden, frozen, depthwise, grad)
    if key not in _CUDA_REFUSALS:
        mod, why = _ext.load("_C_cuda"), None
        limit = _cuda_smem_limit(index) if mod is not None else None
        if limit is not None:
            try:
                fwd, bwd, bwd_sizes = mod.nca_step_smem(C, F, hidden, frozen, depthwise)
            except ValueError as e:
                why = str(e)
            else:
                needs = [("forward", fwd)] + ([("backward", bwd)] if grad else [])
                over = [(part, need) for part, need in needs if need > limit]
                if over:
                    why = (f"its {over[0][0]} needs {over[0][1]} bytes of shared memory for {(F + 1) * C} "
                           f"perception channels, the device allows {limit}")
                elif grad and bwd_sizes:
                    why = bwd_sizes
        _CUDA_REFUSALS[key] = why and why.replace("fastnca nca_step (cuda): ", "")
    return _CUDA_REFUSALS[key]


def nca_unsupported(backend: str, *, C: int, F: int, hidden: int, depthwise: bool, cells: int,
                    height: int, width: int, frozen: int = 0, grad: bool = True,
                    device: torch.device | None = None) -> str | None:
    """Why ``backend``'s nca_step kernels refuse these sizes (NCA_LIMITS; for ``cuda`` on a
    given CUDA ``device``, also its shared memory, the backward's only where ``grad``), or
    None. The shared-memory check runs on eager calls: under torch.compile the sizes may be
    symbolic (dynamo reports a SymInt as an int), and the kernels check them again anyway."""
    lim = NCA_LIMITS.get(backend, {})
    if _over(C, lim.get("channels")):
        return f"its kernels support at most {lim['channels']} channels, got {C}"
    if _over(F, lim.get("filters")):
        return f"its kernels support at most {lim['filters']} filters per channel, got {F}"
    if _over(hidden, lim.get("hidden")):
        return f"its kernels support a hidden size of at most {lim['hidden']}, got {hidden}"
    if _over(height, lim.get("side"), grid=True) or _over(width, lim.get("side"), grid=True):
        return f"its kernels support height and width of at most {lim['side']}, got {height}x{width}"
    if depthwise and _over(F, lim.get("depthwise_filters")):
        return f"its kernels support at most {lim['depthwise_filters']} depthwise filters per channel, got {F}"
    if _over(cells, lim.get("cells"), grid=True):
        return f"its kernels support at most {lim['cells']} cells (B*H*W), got {cells}"
    if (backend == "cuda" and device is not None and device.type == "cuda" and not torch.compiler.is_compiling()
            and all(type(n) is int for n in (C, F, hidden, frozen))):  # not symbolic (export)
        return _cuda_nca_refusal(device.index, C, F, hidden, frozen, bool(depthwise), bool(grad))
    return None


# The same for neighborhood_attention2d: every dimension (cpu), or H and W (the border maps'
# int32 arithmetic), at most 2^30.
ATTENTION_LIMITS = {"cpu": {"dim": 1 << 30}, "cuda": {"side": 1 << 30}, "triton": {"side": 1 << 30}}


def attention_unsupported(backend: str, *, shape: tuple) -> str | None:
    """Why ``backend``'s attention kernels refuse q/k/v of ``shape`` [B, H, W, heads, D], or None."""
    lim = ATTENTION_LIMITS.get(backend, {})
    if any(_over(n, lim.get("dim"), grid=True) for n in shape):
        return f"its kernels support sizes of at most {lim['dim']} in every dimension, got {tuple(shape)}"
    if _over(shape[1], lim.get("side"), grid=True) or _over(shape[2], lim.get("side"), grid=True):
        return f"its kernels support height and width of at most {lim['side']}, got {shape[1]}x{shape[2]}"
    return None


def backend_for_input(t: torch.Tensor, backend: str) -> str:
    """The backend to run an op on input ``t`` with: the reference where ``t`` is empty (a
    batch of 0, or no heads; the ops check the other sizes), whose torch ops give the empty
    results and zero weight gradients as conv2d and SDPA do; otherwise ``backend``."""
    return "reference" if t.numel() == 0 else backend


def check_name(backend, source: str = "backend") -> None:
    """A backend name: a str among BACKENDS (``source`` names where it came from)."""
    if not isinstance(backend, str):
        raise TypeError(f"{source} must be None or a str, one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be {'None or ' if source == 'backend' else ''}one of {BACKENDS}, "
                         f"got {backend!r}")


@torch.compiler.assume_constant_result
def _env_backend() -> str:
    """FASTNCA_BACKEND, "" when unset. Under torch.compile it is read once, at trace time, as
    a constant (dynamo of torch 2.4 cannot trace os.environ.get of an unset variable)."""
    return os.environ.get("FASTNCA_BACKEND", "")


def resolve(backend: str | None, op: str, device: torch.device, dtype: torch.dtype | None = None,
            sizes: dict | None = None) -> str:
    """Concrete backend for ``op`` on ``device`` (and tensors of ``dtype``, and for nca_step
    the rule's and state's ``sizes`` (nca_unsupported's keywords; attention_unsupported's for
    the attention), when given); raises with
    the reason when impossible."""
    source = "backend"
    if backend is None and (env := _env_backend()):
        backend, source = env, "FASTNCA_BACKEND"

    def refuses(name):
        if sizes is None:
            return None
        if op == "nca_step":
            return nca_unsupported(name, device=device, **sizes)
        return attention_unsupported(name, **sizes)

    if backend is None:
        for name in _AUTO.get((device.type, op), _AUTO.get(device.type, ("reference",))):
            if (_usable_on(name, device) is True and has_kernel(name, op)
                    and (dtype is None or dtype in _DTYPES[name]) and not refuses(name)):
                return name
        return "reference"
    check_name(backend, source)
    status = _usable_on(backend, device)
    if status is not True:
        raise RuntimeError(f"fastnca backend {backend!r}"
                           f"{' (from FASTNCA_BACKEND)' if source == 'FASTNCA_BACKEND' else ''} is not usable for {op}: "
                           f"{status}")
    if not has_kernel(backend, op):
        raise NotImplementedError(f"fastnca backend {backend!r} has no {op} kernel")
    fix = ("unset FASTNCA_BACKEND or set it to 'reference'" if source == "FASTNCA_BACKEND"
           else "use backend=None or 'reference'")
    why = refuses(backend)
    if why:
        raise ValueError(f"fastnca backend {backend!r} cannot run this {op}: {why}; {fix}")
    if dtype is not None and dtype not in _DTYPES[backend]:
        raise TypeError(f"fastnca backend {backend!r} does not support {dtype} tensors "
                        f"(it takes {', '.join(str(d).replace('torch.', '') for d in _DTYPES[backend])}); {fix}")
    return backend
