"""Eager calls of the ops without the dispatcher's round trip.

Each op is a ``torch.library.custom_op`` with a registered autograd formula: that is what
``torch.compile``, ``torch.export`` and tensor subclasses (FakeTensor, FunctionalTensor)
see. An eager call of plain tensors runs the same implementation and the same
setup/gradient code through a ``torch.autograd.Function`` instead, and skips autograd
altogether when no input needs a gradient: the custom op's Python dispatch took a third of
an attention fwd+bwd's host time with the kernel launches stubbed out (137 -> 92 us on 2
CPU cores, 2026-11-26), host time that bounds eager calls of sub-millisecond kernels.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain(*tensors: torch.Tensor | None) -> bool:
    """True for an eager call whose tensors are all plain ``torch.Tensor`` (or Parameter):
    not traced by torch.compile / torch.export, no subclass, no dispatch mode (make_fx,
    FakeTensorMode, a user's TorchDispatchMode) and no torch.func transform (its wrapped
    tensors would reach the kernels in backward) that must see the op."""
    if torch.compiler.is_compiling() or _dispatch_modes() or _func_transform():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def _dispatch_modes() -> int:
    stack = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return stack() if stack is not None else 1  # unknown: assume a mode, take the op


def _func_transform() -> bool:
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is None or peek() is not None  # unknown: assume one, take the op


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def call(op: Callable, function: type[torch.autograd.Function], impl: Callable, tensors: tuple, args: tuple,
         grad: bool | None = None):
    """One public call: the registered ``op`` where something must see it (not plain()),
    else ``function`` (the same code under autograd) when an input needs a gradient (``grad``:
    needs_grad(*tensors), given where the caller has it already), else the implementation
    ``impl`` itself."""
    if not plain(*tensors):
        return op(*args)
    return function.apply(*args) if (needs_grad(*tensors) if grad is None else grad) else impl(*args)


def function(name: str, forward: Callable, setup: Callable, grad: Callable) -> type[torch.autograd.Function]:
    """An autograd.Function computing ``forward(*inputs)``, then ``setup(ctx, inputs,
    output)`` and ``grad(ctx, *grad_outputs)``: the op's implementation and the same
    functions its custom op registers with ``register_autograd`` (``grad`` here given the
    backward's implementation rather than its op)."""

    def fwd(ctx, *inputs):
        output = forward(*inputs)
        setup(ctx, inputs, output)
        return output

    @once_differentiable  # as the custom op, whose backward op has no autograd formula:
    def bwd(ctx, *grad_outputs):  # a double backward raises instead of dropping terms
        return grad(ctx, *grad_outputs)

    # (the setup_context form, which torch.func's transforms take, cost ~25 us more a
    # fwd+bwd on 2 CPU cores; those transforms go through the custom ops: plain())
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})
