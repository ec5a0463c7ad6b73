"""``fastnca.nca_step`` and ``fastnca.nca_rollout``: the NCA update rule as one op.

Per cell: perception P = [state | conv3x3(pad(state))], h = relu(fc1(P)), delta = fc2(h),
new = state + fire_mask * delta on the non-frozen channels. Kernels never write P, h or
the mask to memory; backward recomputes them from the saved inputs (and the mask from
(seed, step)). The rollout saves only every k-th state and recomputes each segment in
backward (k = ceil(sqrt(steps)) by default), so memory is O(sqrt(steps)) states.
"""

import math

import torch

from . import _backend, _checks, _eager
from .kernels._common import compute_dtype

# ---------------------------------------------------------------------------------------
# Custom ops. Seeds travel as two's-complement int64 (schemas have no uint64).
# ---------------------------------------------------------------------------------------


def _nca_step(
    state: torch.Tensor, pw: torch.Tensor, pb: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
    w2: torch.Tensor, b2: torch.Tensor, groups: int, padding: str, update_prob: float, seed: int,
    step: int, frozen: int, backend: str,
) -> torch.Tensor:
    k = _backend.kernel(backend, "nca_step")
    return k.forward(state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob,
                     _checks.seed_from_i64(seed), step, frozen)


_nca_step_op = torch.library.custom_op("fastnca::nca_step", mutates_args=())(_nca_step)


@_nca_step_op.register_fake
def _(state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob, seed, step, frozen, backend):
    return torch.empty_like(state)


def _nca_step_backward(
    grad_out: torch.Tensor, state: torch.Tensor, pw: torch.Tensor, pb: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, groups: int,
    padding: str, update_prob: float, seed: int, step: int, frozen: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    k = _backend.kernel(backend, "nca_step")
    return k.backward(grad_out, state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob,
                      _checks.seed_from_i64(seed), step, frozen)


_nca_step_backward_op = torch.library.custom_op("fastnca::nca_step_backward", mutates_args=())(_nca_step_backward)


def _fake_grads(state, *weights):
    """What every backend's backward returns: d_state like the state (its dense layout kept),
    the weight gradients contiguous whatever the weights' layout (a channels_last conv
    weight, a transposed fc1 view)."""
    return (torch.empty_like(state), *(torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights))


@_nca_step_backward_op.register_fake
def _(grad_out, state, pw, pb, w1, b1, w2, b2, *args):
    return _fake_grads(state, pw, pb, w1, b1, w2, b2)


def _nca_step_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])  # the inputs only: nothing computed is kept
    ctx.params = inputs[7:]


def _nca_step_grad(ctx, grad_out, backward=_nca_step_backward_op):
    grads = backward(grad_out, *ctx.saved_tensors, *ctx.params)
    return (*grads, *([None] * len(ctx.params)))


_nca_step_op.register_autograd(_nca_step_grad, setup_context=_nca_step_setup)
_NcaStepFunction = _eager.function("_NcaStepFunction", "nca_step", _nca_step, _nca_step_setup,
                                   lambda ctx, g: _nca_step_grad(ctx, g, backward=_nca_step_backward))


def _empty_checkpoints(state: torch.Tensor, n: int) -> torch.Tensor:
    """[n, B, C, H, W] in the state's memory format (channels_last stays channels_last)."""
    B, C, H, W = state.shape
    if n > 0 and state.dim() == 4 and state.is_contiguous(memory_format=torch.channels_last) \
            and not state.is_contiguous():
        return torch.empty(n, B, H, W, C, dtype=state.dtype, device=state.device).permute(0, 1, 4, 2, 3)
    return torch.empty(n, B, C, H, W, dtype=state.dtype, device=state.device)


def _segments(steps: int, every: int) -> list[tuple[int, int]]:
    return [(s, min(s + every, steps)) for s in range(0, steps, every)]


def _num_checkpoints(steps: int, every: int, keep: bool) -> int:
    """States the rollout keeps for backward besides its input: the start of every segment
    but the first (none for 0 or 1 segments, or without grad)."""
    return max(0, len(_segments(steps, every)) - 1) if keep else 0


def _prepared(k, state, weights, groups, padding, frozen, steps) -> dict:
    """Keyword arguments that let a backend's kernels reuse the weights it arranged once for
    every step of a rollout (the rule cannot change during the op)."""
    if steps < 2 or not hasattr(k, "prepare"):
        return {}
    return {"prepared": k.prepare(state, *weights, groups, padding, frozen)}


def _nca_rollout(
    state: torch.Tensor, pw: torch.Tensor, pb: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
    w2: torch.Tensor, b2: torch.Tensor, steps: int, start_step: int, every: int, keep: bool,
    groups: int, padding: str, update_prob: float, seed: int, frozen: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    k = _backend.kernel(backend, "nca_step")
    seed = _checks.seed_from_i64(seed)
    segs = _segments(steps, every)
    ckpt = _empty_checkpoints(state, _num_checkpoints(steps, every, keep))
    prep = _prepared(k, state, (pw, pb, w1, b1, w2, b2), groups, padding, frozen, steps)
    x = state
    for j, (a, b) in enumerate(segs):
        if keep and j > 0:
            ckpt[j - 1].copy_(x)
        for i in range(a, b):
            x = k.forward(x, pw, pb, w1, b1, w2, b2, groups, padding, update_prob, seed,
                          (start_step + i) & 0xFFFFFFFF, frozen, **prep)
    return (x.clone() if steps == 0 else x), ckpt


_nca_rollout_op = torch.library.custom_op("fastnca::nca_rollout", mutates_args=())(_nca_rollout)


@_nca_rollout_op.register_fake
def _(state, pw, pb, w1, b1, w2, b2, steps, start_step, every, keep, *args):
    return torch.empty_like(state), _empty_checkpoints(state, _num_checkpoints(steps, every, keep))


def _nca_rollout_backward(
    grad_out: torch.Tensor, state: torch.Tensor, ckpt: torch.Tensor, pw: torch.Tensor,
    pb: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
    steps: int, start_step: int, every: int, groups: int, padding: str, update_prob: float,
    seed: int, frozen: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    k = _backend.kernel(backend, "nca_step")
    seed = _checks.seed_from_i64(seed)
    weights = (pw, pb, w1, b1, w2, b2)
    # A backend with a GradSink keeps the float32 sums of every step's weight gradients in
    # its own layout (bitwise the sums autograd makes of the loop) and unpacks them once;
    # otherwise each step's gradients are unpacked and added up here.
    sink = k.GradSink() if hasattr(k, "GradSink") and steps > 0 else None
    acc_dtype = compute_dtype(state.dtype)
    dweights = [] if sink else [torch.zeros(w.shape, dtype=acc_dtype, device=w.device) for w in weights]
    g = grad_out
    segs = _segments(steps, every)
    prep = _prepared(k, state, weights, groups, padding, frozen, steps)
    # After the first step, the state gradient is this function's own buffer: a backend that
    # can write d_state over its grad_out reuses it for every step (one state less at the peak).
    in_place = getattr(k, "BACKWARD_OUT_MAY_BE_GRAD", False)
    for j in range(len(segs) - 1, -1, -1):
        a, b = segs[j]
        # Recompute the segment's states from its checkpoint (transient, not saved).
        xs = [state if j == 0 else ckpt[j - 1]]
        for i in range(a, b - 1):
            xs.append(k.forward(xs[-1], *weights, groups, padding, update_prob, seed,
                                (start_step + i) & 0xFFFFFFFF, frozen, **prep))
        for i in range(b - 1, a - 1, -1):
            kw = dict(prep, out=g) if in_place and g is not grad_out else dict(prep)
            if sink:
                kw["sink"] = sink
            g, *dw = k.backward(g, xs.pop(), *weights, groups, padding, update_prob, seed,
                                (start_step + i) & 0xFFFFFFFF, frozen, **kw)
            for acc, d in zip(dweights, dw):
                acc += d
    # Recomputed states take the checkpoints' layout (NCHW unless the state is channels_last):
    # a densely permuted state gets its gradient in its own layout (the strides empty_like
    # gives, read off a meta tensor: no state-sized buffer unless a copy is needed).
    if steps == 0 or g.stride() != torch.empty_like(state, device="meta").stride():
        g = torch.empty_like(state).copy_(g if steps else grad_out)
    return (g, *(sink.result() if sink else (d.to(w.dtype) for d, w in zip(dweights, weights))))


_nca_rollout_backward_op = torch.library.custom_op("fastnca::nca_rollout_backward", mutates_args=())(
    _nca_rollout_backward)


@_nca_rollout_backward_op.register_fake
def _(grad_out, state, ckpt, pw, pb, w1, b1, w2, b2, *args):
    return _fake_grads(state, pw, pb, w1, b1, w2, b2)


def _nca_rollout_setup(ctx, inputs, output):
    state, pw, pb, w1, b1, w2, b2 = inputs[:7]
    steps, start_step, every, keep = inputs[7:11]
    ctx.save_for_backward(state, output[1], pw, pb, w1, b1, w2, b2)
    ctx.params = (steps, start_step, every) + tuple(inputs[11:])
    ctx.keep = keep
    ctx.non_tensor_inputs = len(inputs) - 7
    # The checkpoints are an internal output: no gradient flows into them, and autograd must
    # not materialise one (a zero tensor the size of every checkpoint, at the backward's peak).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _nca_rollout_grad(ctx, grad_out, grad_ckpt, backward=_nca_rollout_backward_op):
    if not ctx.keep:
        raise RuntimeError("nca_rollout ran without keeping checkpoints (grad was disabled "
                           "or no input required grad) but backward was called")
    state, ckpt, *weights = ctx.saved_tensors
    if grad_out is None:  # the output took no part in the loss
        return (None,) * (7 + ctx.non_tensor_inputs)
    grads = backward(grad_out, state, ckpt, *weights, *ctx.params)
    return (*grads, *([None] * ctx.non_tensor_inputs))


_nca_rollout_op.register_autograd(_nca_rollout_grad, setup_context=_nca_rollout_setup)
_NcaRolloutFunction = _eager.function(
    "_NcaRolloutFunction", "nca_rollout", _nca_rollout, _nca_rollout_setup,
    lambda ctx, g, g_ckpt: _nca_rollout_grad(ctx, g, g_ckpt, backward=_nca_rollout_backward))

# ---------------------------------------------------------------------------------------
# Public functions: checks, normalisation, dispatch.
# ---------------------------------------------------------------------------------------


def _check_and_normalise(state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob, seed,
                         frozen):
    _checks.tensor(state, "state", ndim=4)
    _checks.floating(state, "state")
    B, C, H, W = state.shape
    if C < 1 or H < 1 or W < 1:  # not min(): it compares H with W under torch.export
        raise ValueError(f"state must have C, H, W >= 1 (B may be 0), got shape {tuple(state.shape)}")
    padding = _checks.choice(padding, "padding", _checks.PADDINGS)
    if padding == "reflect" and (H < 2 or W < 2):
        raise ValueError(f"padding='reflect' needs height and width >= 2, got state of shape {tuple(state.shape)}")
    groups = _checks.groups(groups, C)
    frozen = _checks.integer(frozen, "frozen_channels", 0, C + 1)
    update_prob = _checks.probability(update_prob, "update_prob")
    seed = _checks.seed(seed)

    _checks.tensor(pw, "perception_weight", ndim=4)
    if pw.shape[0] % C or pw.shape[0] == 0 or tuple(pw.shape[1:]) != (C // groups, 3, 3):
        raise ValueError(f"perception_weight must have shape [F*{C}, {C // groups}, 3, 3] (F >= 1 filters "
                         f"per channel, groups={groups}), got {tuple(pw.shape)}")
    nf = pw.shape[0] // C
    _checks.tensor(w1, "fc1_weight", ndim=2)
    if w1.shape[1] != (nf + 1) * C or w1.shape[0] < 1:
        raise ValueError(f"fc1_weight must have shape [hidden, {(nf + 1) * C}] ((F+1)*C with F={nf}), "
                         f"got {tuple(w1.shape)}")
    hidden = w1.shape[0]
    _checks.tensor(w2, "fc2_weight", ndim=2)
    if w2.shape[1] != hidden or (w2.shape[0] != C and w2.shape[0] != C - frozen):
        shapes = f"[{C}, {hidden}]" + (f" or [{C - frozen}, {hidden}] (C or C - frozen_channels rows)"
                                        if frozen else "")
        raise ValueError(f"fc2_weight must have shape {shapes}, got {tuple(w2.shape)}")
    for name, b, n in (("perception_bias", pb, nf * C), ("fc1_bias", b1, hidden), ("fc2_bias", b2, w2.shape[0])):
        if b is not None:
            _checks.tensor(b, name, ndim=1)
            _checks.shape(b, name, (n,))
    for name, t in (("perception_weight", pw), ("perception_bias", pb), ("fc1_weight", w1),
                    ("fc1_bias", b1), ("fc2_weight", w2), ("fc2_bias", b2)):
        if t is not None:
            _checks.floating(t, name)
    _checks.same_device(state, "state", perception_weight=pw, perception_bias=pb, fc1_weight=w1,
                        fc1_bias=b1, fc2_weight=w2, fc2_bias=b2)

    def zeros(n, like):
        return torch.zeros(n, dtype=like.dtype, device=like.device)

    pb = zeros(nf * C, pw) if pb is None else pb
    b1 = zeros(hidden, w1) if b1 is None else b1
    b2 = zeros(w2.shape[0], w2) if b2 is None else b2
    if w2.shape[0] == C and frozen:
        w2, b2 = w2[frozen:], b2[frozen:]  # rows of frozen channels are ignored
    return (state, pw, pb, w1, b1, w2, b2), (groups, padding, update_prob, seed, frozen)


def _sizes(state, pw, w1, groups, frozen, grad) -> dict:
    """The sizes backend selection checks against the kernels' limits (_backend.NCA_LIMITS),
    and whether the call will need the backward (grad)."""
    B, C, H, W = state.shape
    return dict(C=C, F=pw.shape[0] // C, hidden=w1.shape[0], depthwise=groups != 1, cells=B * H * W,
                height=H, width=W, frozen=frozen, grad=grad)


def nca_step(state, perception_weight, perception_bias, fc1_weight, fc1_bias, fc2_weight,
             fc2_bias=None, *, groups=1, padding="reflect", update_prob=0.5, seed, step=0,
             frozen_channels=0, backend=None):
    """One NCA update step, fused: perception, per-cell MLP, stochastic residual update.

    With ``P = cat([state, conv2d(pad(state), perception_weight, perception_bias,
    groups=groups)], dim=1)`` (3x3 perception, padded by ``padding``), the per-cell MLP
    ``delta = fc2(relu(fc1(P)))`` and ``m = fire_mask(B, H, W, update_prob, seed, step)``::

        out[:, :f] = state[:, :f]                     (f = frozen_channels, never updated)
        out[:, f:] = state[:, f:] + m * delta[:, f:]

    Cells that do not fire keep their state exactly, on every backend, also where their
    delta would not be finite (the kernels compute delta only for the firing cells).
    Half inputs compute in float32 inside and store in their dtype. Autograd saves only
    the inputs: perception, hidden activations and the mask are recomputed in backward.

    Args:
        state: [B, C, H, W] float32/float16/bfloat16 (float64 on "cpu"/"reference"), any
            memory format (channels_last is read in place; the output keeps the format).
            C, H, W >= 1; B may be 0 (an empty result and zero weight gradients).
        perception_weight: [F*C, C/groups, 3, 3], F >= 1 filter banks per channel.
        perception_bias: [F*C] or None.
        fc1_weight, fc1_bias: [hidden, (F+1)*C] and [hidden] (or None).
        fc2_weight, fc2_bias: [C, hidden] and [C], or [C - frozen_channels, ...] without the
            frozen rows (rows of frozen channels are ignored); bias may be None.
        groups: 1 (full perception) or C (depthwise).
        padding: "reflect" (needs H, W >= 2), "zeros", "circular" or "replicate".
        update_prob: probability that a cell updates, in [0, 1] (1 - Med-NCA's fire_rate).
        seed: int in [0, 2^64); step: int >= 0 (mod 2^32): the mask's Philox key and counter.
        frozen_channels: leading channels copied unchanged (e.g. Med-NCA's input image).
        backend: None (fastest usable for the device and dtype; env FASTNCA_BACKEND
            overrides), "reference", "cpu", "cuda" or "triton".

    Returns:
        The new state, same shape, dtype and memory format as ``state``.
    """
    tensors, (groups, padding, update_prob, seed, frozen) = _check_and_normalise(
        state, perception_weight, perception_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
        groups, padding, update_prob, seed, frozen_channels)
    step = _checks.step_counter(step)
    grad = _eager.needs_grad(*tensors)
    sizes = _sizes(state, tensors[1], tensors[3], groups, frozen, grad)
    backend = _backend.backend_for_input(state, _backend.resolve(backend, "nca_step", state.device, state.dtype, sizes))
    args = (*tensors, groups, padding, update_prob, _checks.seed_to_i64(seed), step, frozen, backend)
    return _eager.call(_nca_step_op, _NcaStepFunction, _nca_step, tensors, args, grad=grad)


def nca_rollout(state, perception_weight, perception_bias, fc1_weight, fc1_bias, fc2_weight,
                fc2_bias=None, *, steps, start_step=0, checkpoint_every=None, groups=1,
                padding="reflect", update_prob=0.5, seed, frozen_channels=0, backend=None):
    """``steps`` applications of :func:`nca_step`, step i drawing its mask with
    ``step = start_step + i``: bitwise the same as that loop, in O(sqrt(steps)) memory.

    Autograd saves the input and the state at the start of every later segment of
    ``checkpoint_every`` steps (default ceil(sqrt(steps))): max(1, ceil(steps /
    checkpoint_every)) states, within the contract's ceil(steps / checkpoint_every) + 1.
    Backward recomputes each segment from its checkpoint. The backend's kernels arrange the
    weights once for all steps.

    Args:
        state ... frozen_channels, backend: as for :func:`nca_step`.
        steps: number of steps (>= 0; 0 returns a copy of ``state``).
        start_step: counter of the first step's mask (>= 0, mod 2^32).
        checkpoint_every: steps per checkpointed segment (>= 1), default ceil(sqrt(steps)).

    Returns:
        The state after ``steps`` steps, like ``state``.
    """
    tensors, (groups, padding, update_prob, seed, frozen) = _check_and_normalise(
        state, perception_weight, perception_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
        groups, padding, update_prob, seed, frozen_channels)
    steps = _checks.integer(steps, "steps", 0)
    start_step = _checks.step_counter(start_step, "start_step")
    if checkpoint_every is None:
        every = max(1, math.ceil(math.sqrt(steps)))
    else:
        every = _checks.integer(checkpoint_every, "checkpoint_every", 1)
    keep = _eager.needs_grad(*tensors)
    backend = _backend.backend_for_input(state, _backend.resolve(backend, "nca_step", state.device, state.dtype,
                                                                 _sizes(state, tensors[1], tensors[3], groups, frozen, keep)))
    args = (*tensors, steps, start_step, every, keep, groups, padding, update_prob, _checks.seed_to_i64(seed),
            frozen, backend)
    out, _ = _eager.call(_nca_rollout_op, _NcaRolloutFunction, _nca_rollout, tensors, args, grad=keep)
    return out
