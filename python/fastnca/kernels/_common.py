"""Helpers that the compiled-kernel launchers (cpu, cuda, triton) share."""
from __future__ import annotations

import torch

# A backward that needs an fp32 workspace per cell runs over batch chunks (the fire mask
# indexed from the chunk's first cell) so that the workspace never outgrows the state itself,
# but no chunk has fewer cells than this, which keeps a large GPU busy.
BACKWARD_CHUNK_MIN_CELLS = 1 << 16


def backward_batch_chunk(state: torch.Tensor, ws_bytes_per_cell: int) -> int:
    """Batch items per launch of a backward with ``ws_bytes_per_cell`` bytes of workspace per
    cell: the workspace stays within the state's bytes, or holds at least
    BACKWARD_CHUNK_MIN_CELLS cells."""
    B, C, H, W = state.shape
    by_bytes = C * state.element_size() * B // max(1, ws_bytes_per_cell)
    by_cells = -(-BACKWARD_CHUNK_MIN_CELLS // (H * W))
    return max(1, min(B, max(by_bytes, by_cells)))


class Prepared:
    """A rule a backend arranged once (its ``prepare``) for the steps of one nca_rollout,
    with what it was arranged for: the arranged buffers' sizes are the kernels' bounds, so
    a call with another rule or state layout is refused (``arranged``), not run out of
    bounds."""

    __slots__ = ("value", "key")

    def __init__(self, value, state, weights, groups, padding, frozen):
        self.value = value
        self.key = _rule_key(state, weights, groups, padding, frozen)


_WEIGHTS = ("pw", "pb", "w1", "b1", "w2", "b2")
_KEY_NAMES = ("channels", "state dtype", "device", "groups", "padding", "frozen",
              *(f"{w} shape" for w in _WEIGHTS), *(f"{w} dtype" for w in _WEIGHTS))


def _rule_key(state, weights, groups, padding, frozen) -> tuple:
    # flat, torch.Size as is: ~1.7 us a call on 2 CPU cores (a rollout step checks 2-3 times)
    return (state.shape[1], state.dtype, state.device, groups, padding, frozen,
            *[w.shape for w in weights], *[w.dtype for w in weights])


def arranged(prepared: Prepared | None, state, weights, groups, padding, frozen):
    """The arranged rule of ``prepared`` (None without one), after checking that this call
    has the channels, dtypes, device, weight shapes, groups, padding and frozen channels it
    was arranged for."""
    if prepared is None:
        return None
    key = _rule_key(state, weights, groups, padding, frozen)
    if key != prepared.key:
        def show(v):  # "(8, 12)" for a torch.Size, "float32" for a dtype
            return str(tuple(v)) if isinstance(v, torch.Size) else str(v).removeprefix("torch.")

        diff = [f"{n} {show(a)} (call) vs {show(b)} (prepared)" for n, a, b in zip(_KEY_NAMES, key, prepared.key)
                if a != b]
        raise ValueError("prepared: arranged for another rule than this call's: " + "; ".join(diff))
    return prepared.value


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend computes and accumulates in for inputs of ``dtype``: float64
    for float64, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cpu_threads() -> int:
    """Threads a CPU kernel launch runs on: torch's intra-op thread count."""
    return max(1, torch.get_num_threads())


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] byte address a tensor with non-negative strides touches."""
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size() - 1


def backward_out(out: torch.Tensor | None, state: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The tensor a backward writes d_state into: a new one like ``state``, or ``out``, which
    must be like ``state``, must not overlap it, and may be ``grad`` itself (same strides)
    but must not overlap it otherwise."""
    if out is None:
        return torch.empty_like(state)
    if out.shape != state.shape or out.dtype != state.dtype or out.device != state.device:
        raise ValueError(f"out must match state ({tuple(state.shape)}, {state.dtype}, {state.device}), "
                         f"got ({tuple(out.shape)}, {out.dtype}, {out.device})")
    if any(s < 0 for s in out.stride()) or torch._debug_has_internal_overlap(out) != 0:
        raise ValueError(f"out must have non-negative strides whose elements torch can tell apart "
                         f"(not overlapping, e.g. dense), got strides {out.stride()}")

    a0, a1 = _span(out)

    def overlaps(t):
        b0, b1 = _span(t)
        return a0 <= b1 and b0 <= a1

    if overlaps(state):
        raise ValueError("out must not overlap state")
    if out is not grad and overlaps(grad) and (out.data_ptr() != grad.data_ptr() or out.stride() != grad.stride()):
        raise ValueError("out may be grad_out itself but must not overlap it otherwise")
    return out
