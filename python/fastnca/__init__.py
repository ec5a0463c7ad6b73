"""fastnca: fused kernels for Neural Cellular Automata.

Three ops -- the stochastic fire mask, the 3x3 perception + per-cell MLP update step
(and its checkpointed rollout), and neighbourhood self-attention over 3x3, 5x5 or 7x7
windows -- each with a ``reference`` (pure PyTorch), ``cpu`` (C++), ``cuda`` (CUDA C++)
and ``triton`` backend.
"""
from ._backend import backends
from .fire_mask import fire_mask
from .nca_step import nca_rollout, nca_step
from .neighborhood_attention import neighborhood_attention2d
from . import nn

__version__ = "0.1.0"
__all__ = ["backends", "fire_mask", "nca_step", "nca_rollout", "neighborhood_attention2d", "nn",
           "__version__"]
