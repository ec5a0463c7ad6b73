"""What every CUDA launcher needs from its surroundings: the compiled module, the device
guard and the stream. One place, so tests/test_cuda_kernels.py can swap all of them for
the host emulation of the kernels (scripts/build_cuda_emulation.sh) on CPU tensors."""
from __future__ import annotations

import torch

from ... import _ext

device_guard = torch.cuda.device


def is_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def stream(device) -> int:
    return _ext.cuda_stream(device)


def module():
    mod = _ext.load("_C_cuda")
    if mod is None:
        raise RuntimeError(_ext.error("_C_cuda") or "fastnca._C_cuda is not available")
    return mod
