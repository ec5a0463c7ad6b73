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
from torch.autograd import forward_ad

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain(*tensors: torch.Tensor | None) -> bool:
    """True for an eager call (call() has ruled out tracing by torch.compile / torch.export)
    whose tensors are all plain ``torch.Tensor`` (or Parameter): no subclass, no dispatch
    mode (make_fx, FakeTensorMode, a user's TorchDispatchMode) and no torch.func transform
    (its wrapped tensors would reach the kernels in backward) that must see the op."""
    if _dispatch_modes() or _func_transform():
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


def call(op, function: type[torch.autograd.Function], impl: Callable, tensors: tuple, args: tuple,
         grad: bool | None = None):
    """One public call: the registered ``op`` (a CustomOpDef) where something must see it
    (not plain()), else ``function`` (the same code under autograd) when an input needs a
    gradient (``grad``: needs_grad(*tensors), given where the caller has it already), else
    the implementation ``impl`` itself. Forward-mode AD and torch.func's differentiating
    transforms raise (unsupported_autodiff)."""
    if torch.compiler.is_compiling():  # traced: dynamo sees the op (and its own transforms)
        return op(*args)
    is_plain = plain(*tensors)
    if not is_plain or getattr(forward_ad, "_current_level", -1) >= 0:
        unsupported_autodiff(op._name, tensors)
    if not is_plain:
        if not needs_grad(*tensors) and _constants_of_a_transform(tensors):
            # (torch 2.4's custom-op autograd refused any func transform, constants too)
            with torch._C._DisableFuncTorch():  # the transform would wrap what the op allocates
                return impl(*args)
        return op(*args)
    return function.apply(*args) if (needs_grad(*tensors) if grad is None else grad) else impl(*args)


def _constants_of_a_transform(tensors: tuple) -> bool:
    """Inside a torch.func transform, with no dispatch mode, the op's tensors are all plain
    and none is wrapped by the transform: constants to it, so the op is one of constants."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not _dispatch_modes() and all(t is None or (type(t) in _PLAIN and not wrapped(t)) for t in tensors)


def unsupported_autodiff(name: str, tensors: tuple) -> None:
    """Raise for what the ops cannot differentiate, rather than give wrong derivatives:
    forward-mode AD (dual tensors of torch.autograd.forward_ad; torch.func.jvp, jacfwd) and
    torch.func.grad / vjp / jacrev, whose torch-internal failure names no fastnca op.
    (Without this, forward_ad got no tangent and torch.func.jvp a zero one.) Only inputs
    the transform differentiates count: an op on constants inside torch.func.grad runs.
    vmap, torch.compile and torch.export are not affected."""
    if _func_transform() and any(t is not None and _differentiated(t) for t in tensors):
        raise NotImplementedError(
            f"fastnca.{name} does not support torch.func's differentiating transforms (grad, vjp, jacrev, jvp, "
            "jacfwd) of its inputs; use torch.autograd.grad or .backward() (torch.func.vmap of the op works)")
    if getattr(forward_ad, "_current_level", -1) >= 0 and any(
            t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(f"fastnca.{name} does not support forward-mode AD (dual tensors); "
                                  "use reverse mode (torch.autograd.grad / .backward())")


def _differentiated(t: torch.Tensor) -> bool:
    """Whether a torch.func grad / jvp level wraps t (a GradTrackingTensor, at any depth of
    functorch wrappers: vmap's BatchedTensor may sit outside it)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_gradtrackingtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


class _DifferentiableOnce(torch.autograd.Function):
    """The identity on a backward's gradients, tied to every tensor they depend on, whose
    own backward raises. torch's once_differentiable ties them to the incoming gradients
    only: a Hessian or a gradient penalty, where those need no gradient, went through
    without an error and with the second-order terms dropped (zero Hessian)."""

    @staticmethod
    def forward(ctx, name, n, *tensors):
        ctx.name = name
        # copies (only under create_graph=True): views would forbid in-place use of the grads
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"fastnca.{ctx.name} is differentiable once: its gradients are computed by kernels "
                           "without a graph of their own, so differentiating them again (create_graph=True, then "
                           "a Hessian or a gradient penalty) is not supported")


def function(name: str, op_name: str, forward: Callable, setup: Callable, grad: Callable
             ) -> type[torch.autograd.Function]:
    """An autograd.Function computing ``forward(*inputs)``, then ``setup(ctx, inputs,
    output)`` and ``grad(ctx, *grad_outputs)``: the op's implementation and the same
    functions its custom op registers with ``register_autograd`` (``grad`` here given the
    backward's implementation rather than its op). Differentiable once, as the custom op,
    whose backward op has no autograd formula: under create_graph=True the gradients come
    out tied to the saved tensors and incoming gradients by _DifferentiableOnce, so a
    second differentiation raises instead of dropping terms."""

    def fwd(ctx, *inputs):
        output = forward(*inputs)
        setup(ctx, inputs, output)
        return output

    def bwd(ctx, *grad_outputs):
        if not torch.is_grad_enabled():  # the usual backward (create_graph=False)
            return grad(ctx, *grad_outputs)
        with torch.no_grad():
            grads = grad(ctx, *grad_outputs)
        deps = [t for t in (*ctx.saved_tensors, *grad_outputs) if t is not None and t.requires_grad]
        if not deps:
            return grads
        given = [i for i, g in enumerate(grads) if g is not None]
        tied = _DifferentiableOnce.apply(op_name, len(given), *(grads[i] for i in given), *deps)
        out = list(grads)
        for i, g in zip(given, tied):
            out[i] = g
        return tuple(out)

    # (the setup_context form, which torch.func's transforms take, cost ~25 us more a
    # fwd+bwd on 2 CPU cores; those transforms go through the custom ops: plain())
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})
