"""Kernels of every op, one subpackage per backend: ``kernels/<backend>/<op>.py``.

Each op module exposes the functions its public op dispatches to (see the op's module
in ``fastnca/``). Inputs arrive validated by the public layer.
"""
