"""Whether this process runs its Triton kernels in Triton's interpreter."""
import triton
from triton.runtime.jit import JITFunction


@triton.jit
def _probe():
    pass


def interpreting() -> bool:
    """True when Triton decorated this package's kernels for its interpreter: TRITON_INTERPRET
    was set, as the installed Triton reads it, when they were imported. They then run on CPU
    tensors, and the launchers pick tiles and dot precisions for the interpreter."""
    return not isinstance(_probe, JITFunction)
