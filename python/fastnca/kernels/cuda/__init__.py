"""Launchers of the CUDA kernels in ``fastnca._C_cuda``."""
