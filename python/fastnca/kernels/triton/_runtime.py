"""What the Triton launchers share: whether this process runs the kernels in Triton's
interpreter, the installed Triton's version, on/off knobs, the device guard and the
float32-accurate dot mode of a device."""
import contextlib
import os
import re

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


@triton.jit
def _probe():
    pass


def interpreting() -> bool:
    """True when Triton decorated this package's kernels for its interpreter: TRITON_INTERPRET
    was set, as the installed Triton reads it, when they were imported. They then run on CPU
    tensors, and the launchers pick tiles and dot precisions for the interpreter."""
    return not isinstance(_probe, JITFunction)


def triton_version() -> tuple[int, int]:
    """(major, minor) of the Triton these kernels were decorated by."""
    return tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])


# Host-side integer helpers. triton.cdiv and triton.next_power_of_2 are constexpr functions
# from Triton 3.5 on, whose host calls cost ~1.5 us each (argument unwrapping): a dozen
# of them per attention fwd+bwd. These are the plain-int equivalents.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


class const(tl.constexpr):
    """A tl.constexpr for module-level constants that kernels read. At every launch Triton
    checks each global a kernel uses against a copy taken at compile time, with ``!=``;
    tl.constexpr's ``!=`` builds constexpr objects (~1.7 us a global on these 2 cores, ~14 us
    of each ~22 us launch of an nca kernel that reads eight). Between two of these it is a
    plain comparison of values; against anything else, tl.constexpr's own."""

    def __ne__(self, other):
        if type(other) is const:
            return self.value != other.value
        return super().__ne__(other)


def knob01(name: str) -> str:
    """An on/off environment knob's value: "" (unset), "0" or "1"; anything else raises."""
    v = os.environ.get(name, "")
    if v not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {v!r}")
    return v


def autotuning() -> bool:
    """Whether the Triton kernels pick their tiles by autotuning: not under the interpreter,
    nor with FASTNCA_TRITON_AUTOTUNE=0, which pins the default tiles (results then bitwise
    identical across processes: a tuned tile can change a reduction's order)."""
    return knob01("FASTNCA_TRITON_AUTOTUNE") != "0" and not interpreting()


_AUTOTUNERS: list = []


def autotune(kernel, **kwargs):
    """triton.autotune(**kwargs)(kernel), kept in a list so that a benchmark can record the
    tile each autotuned kernel picked (tuned_configs)."""
    tuner = triton.autotune(**kwargs)(kernel)
    _AUTOTUNERS.append(tuner)
    return tuner


def tuned_configs() -> dict[str, str]:
    """The config each of this package's autotuned kernels picked for each tuning key so far
    in this process, "kernel[key]": "config" (Triton's Autotuner keeps them in its cache)."""
    return {f"{tuner.fn.fn.__name__}{list(key)}": str(config)
            for tuner in _AUTOTUNERS for key, config in getattr(tuner, "cache", {}).items()}


def on_device(device: torch.device):
    """The launch's device guard: the tensor's CUDA device current, nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _has_tf32x3() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        return "tf32x3" in CUDAOptions.allowed_dot_input_precisions
    except Exception:  # noqa: BLE001 -- an older/other backend: fall back to ieee
        return False


_TF32X3 = _has_tf32x3()


def fp32_dot_precision(device: torch.device) -> str:
    """The float32-accurate dot mode of a CUDA device: "tf32x3" on sm_80+ where this Triton
    has it, else "ieee"."""
    return "tf32x3" if _TF32X3 and torch.cuda.get_device_capability(device)[0] >= 8 else "ieee"
