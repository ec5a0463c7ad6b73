"""Launchers of the C++ CPU kernels in ``fastnca._C``."""
