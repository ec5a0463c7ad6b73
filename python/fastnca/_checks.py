"""Argument validation shared by the public ops. Every error names the argument and says
what was expected, so a wrong call fails here and never inside a kernel."""
from __future__ import annotations

import numbers
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 is accepted too: it is the gradcheck dtype of the reference and CPU kernels.
COMPUTE_DTYPES = FLOAT_DTYPES + (torch.float64,)
PADDINGS = ("reflect", "zeros", "circular", "replicate")
BORDERS = ("zeros", "mask", "circular", "shift")
_FLOAT32_MAX = torch.finfo(torch.float32).max


def tensor(x, name: str, *, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension{'s' if ndim != 1 else ''}, got shape {tuple(x.shape)}")
    return x


def boolean(x, name: str) -> bool:
    """A Python bool from a bool or a numpy bool (not from ints: 0/1 are not flags here)."""
    if isinstance(x, bool):  # first: dynamo of torch 2.4 cannot trace type(x).__module__
        return x
    if type(x).__module__ == "numpy" and type(x).__name__ in ("bool_", "bool"):
        return bool(x)
    raise TypeError(f"{name} must be a bool, got {type(x).__module__}.{type(x).__name__}"
                    if type(x).__module__ != "builtins" else f"{name} must be a bool, got {type(x).__name__}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def floating(x: torch.Tensor, name: str, dtypes: Iterable[torch.dtype] = COMPUTE_DTYPES) -> None:
    dtypes = tuple(dtypes)
    if x.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        expected = names if len(dtypes) == 1 else f"one of {names}"
        raise TypeError(f"{name} must have dtype {expected}; got {dtype_name(x.dtype)}")


def autocast_on(device: torch.device) -> bool:
    """torch.autocast is enabled for ``device``'s type (False for types without autocast: meta)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


def parameter_dtype(x: torch.Tensor, name: str, dtype: torch.dtype, owner: str) -> None:
    """A module input of its parameters' ``dtype``, or of any floating dtype under autocast
    (which casts both operands of the module's matmuls)."""
    if x.dtype != dtype and not (x.is_floating_point() and autocast_on(x.device)):
        raise TypeError(f"{name} must have the {owner}'s dtype {dtype_name(dtype)} (or run under torch.autocast), "
                        f"got {dtype_name(x.dtype)}")


def shape(x: torch.Tensor, name: str, expected: tuple, what: str = "") -> None:
    if tuple(x.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{extra}, got {tuple(x.shape)}")


def same_device(ref: torch.Tensor, ref_name: str, **others: torch.Tensor | None) -> None:
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; all inputs must share a device")


def kernel_size(x) -> int:
    """An attention window size: 3, 5 or 7."""
    k = integer(x, "kernel_size")
    if k != 3 and k != 5 and k != 7:
        raise ValueError(f"kernel_size must be 3, 5 or 7 (odd; 3 is the cell and its 8 neighbours), got {k}")
    return k


def attention_scale(x) -> float | None:
    """An attention logit scale: None (the op's default) or a finite float."""
    if x is None:
        return None
    scale = real(x, "scale", "None or a finite float")
    # float32's range, not just finite: the kernels scale float32 logits, where a larger
    # scale is inf (not math.isfinite: a SymFloat under torch.compile)
    if not -_FLOAT32_MAX <= scale <= _FLOAT32_MAX:
        raise ValueError(f"scale must be None or a finite float within float32's range "
                         f"(|scale| <= {_FLOAT32_MAX:.4g}), got {scale!r}")
    return scale


def groups(x, channels) -> int:
    """A perception's groups: 1 (full 3x3 convs) or ``channels`` (depthwise)."""
    g = integer(x, "groups")
    # Explicit comparisons, not `in`: under torch.compile(dynamic=True) the channel count is
    # symbolic, and dynamo evaluated `4 in (s0, s0 - 1)` as False (valid calls refused).
    if g != 1 and g != channels:
        raise ValueError(f"groups must be 1 or the channel count {channels}, got {g}")
    return g


def integer(x, name: str, low: int | None = None, high: int | None = None) -> int:
    """An int in [low, high) (Python int, numpy int or 0-dim integer tensor)."""
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_floating_point() and x.dtype != torch.bool:
        _has_value(x, name, "an integer")
        x = int(x.item())
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(x).__name__}")
    x = int(x)
    if (low is not None and x < low) or (high is not None and x >= high):
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        raise ValueError(f"{name} must be in [{lo}, {hi}), got {x}")
    return x


def real(x, name: str, what: str = "a float") -> float:
    """A Python float from a real number or a 0-dim (non-bool) tensor, like integer()."""
    if isinstance(x, torch.Tensor) and x.dim() == 0 and x.dtype != torch.bool and not x.is_complex():
        if x.requires_grad:
            raise TypeError(f"{name} must be {what}; a tensor that requires grad is not supported "
                            "(no gradient flows to it): pass a float or a detached tensor")
        _has_value(x, name, what)
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {type(x).__name__}")
    try:
        return float(x)
    except OverflowError:  # an int past float64's range
        raise ValueError(f"{name} must be {what}, got an integer of {len(str(abs(int(x))))} digits") from None


def _has_value(x: torch.Tensor, name: str, what: str) -> None:
    """A scalar argument given as a tensor must hold a value (a meta tensor has none)."""
    if x.device.type == "meta":
        raise TypeError(f"{name} must be {what}; a meta tensor has no value")


def probability(x, name: str) -> float:
    x = real(x, name, "a float in [0, 1]")
    if not 0.0 <= x <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {x}")
    return x


def choice(x, name: str, options: tuple) -> str:
    if x not in options:
        raise ValueError(f"{name} must be one of {options}, got {x!r}")
    return x


def step_counter(x, name: str = "step") -> int:
    """A step: an int in [0, 2^64), of which only the low 32 bits enter the fire-mask
    counter (DESIGN.md, Op 1), returned reduced (% rather than &, which dynamo of torch 2.5
    cannot apply to a symbolic int)."""
    return integer(x, name, 0, 1 << 64) % (1 << 32)


def seed(x, name: str = "seed") -> int:
    return integer(x, name, 0, 1 << 64)


# Seeds span [0, 2^64) but torch.library schemas carry int64: pass them two's-complement.
def seed_to_i64(s: int) -> int:
    return s - (1 << 64) if s >= (1 << 63) else s


def seed_from_i64(s: int) -> int:
    return s & ((1 << 64) - 1)
