"""Whether this process runs its Triton kernels in Triton's interpreter, and the installed
Triton's version."""
import re

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
