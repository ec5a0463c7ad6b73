"""What every CUDA launcher needs from its surroundings: the compiled module, the device
guard and the stream. One place, so tests/test_cuda_kernels.py can swap all of them for
the host emulation of the kernels (scripts/build_cuda_emulation.sh) on CPU tensors."""
from __future__ import annotations

import torch

from ... import _ext

device_guard = torch.cuda.device

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def stream(device) -> int:
    return _ext.cuda_stream(device)


def module():
    mod = _ext.load("_C_cuda")
    if mod is None:
        raise RuntimeError(_ext.error("_C_cuda") or "fastnca._C_cuda is not available")
    return mod


def check_tensor(t: torch.Tensor, name: str, op: str) -> None:
    """A CUDA tensor of a dtype the kernels store (float64 is the cpu/reference backends')."""
    if not is_cuda(t):
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got {name} on {t.device}")
    if t.dtype == torch.float64:
        raise TypeError(f"the CUDA {op} kernels support float32, float16 and bfloat16, not float64; "
                        "use backend='cpu' or 'reference' for float64")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
