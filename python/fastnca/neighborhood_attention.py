"""``fastnca.neighborhood_attention2d``: every cell attends to its kernel_size x kernel_size
neighbourhood (GeCA's 3x3 local attention; NATTEN's semantics under ``border="shift"``).

Forward saves q, k, v, o and the log-sum-exp; backward recomputes the probabilities
(FlashAttention-style) and gathers dk, dv over each key's inverse neighbourhood,
deterministically. D_i = sum_j p_ij dp_ij = <do_i, o_i>: the reference, cpu and cuda
backends form it from the float32 recompute; triton, as FlashAttention, from the saved o,
rounded to the input dtype, which costs half-precision gradients accuracy where values
share an offset large against their spread.
"""


import torch

from . import _backend, _checks, _eager
from .kernels._common import compute_dtype


def _na2d(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, border: str,
    scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backend.kernel(backend, "neighborhood_attention").forward(q, k, v, kernel_size, border, scale)


_na2d_op = torch.library.custom_op("fastnca::neighborhood_attention2d", mutates_args=())(_na2d)


@_na2d_op.register_fake
def _(q, k, v, kernel_size, border, scale, backend):
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return o, torch.empty(q.shape[:-1], dtype=compute_dtype(q.dtype), device=q.device)


def _na2d_backward(
    grad_o: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, kernel_size: int, border: str,
    scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kern = _backend.kernel(backend, "neighborhood_attention")
    return kern.backward(grad_o, grad_lse, q, k, v, o, lse, kernel_size, border, scale)


_na2d_backward_op = torch.library.custom_op("fastnca::neighborhood_attention2d_backward", mutates_args=())(
    _na2d_backward)


@_na2d_backward_op.register_fake
def _(grad_o, grad_lse, q, k, v, o, lse, kernel_size, border, scale, backend):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _na2d_setup(ctx, inputs, output):
    q, k, v, kernel_size, border, scale, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)  # the whole memory contract: q, k, v, o, lse
    ctx.params = (kernel_size, border, scale, backend)
    ctx.set_materialize_grads(False)  # no zero grad_lse when the lse is not used


def _na2d_grad(ctx, grad_o, grad_lse, backward=_na2d_backward_op):
    q, k, v, o, lse = ctx.saved_tensors
    if grad_o is None and grad_lse is None:
        return None, None, None, None, None, None, None
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    dq, dk, dv = backward(grad_o, grad_lse, q, k, v, o, lse, *ctx.params)
    return dq, dk, dv, None, None, None, None


_na2d_op.register_autograd(_na2d_grad, setup_context=_na2d_setup)
# eager calls of plain tensors (_eager): the same functions, without the dispatcher
_NA2dFunction = _eager.function("_NA2dFunction", "neighborhood_attention2d", _na2d, _na2d_setup,
                                lambda ctx, g_o, g_lse: _na2d_grad(ctx, g_o, g_lse, backward=_na2d_backward))


def _check(query, key, value, kernel_size, border, scale):
    for name, t in (("query", query), ("key", key), ("value", value)):
        _checks.tensor(t, name, ndim=5)
        _checks.floating(t, name)
    if not (query.shape == key.shape == value.shape):
        raise ValueError("query, key and value must have the same shape [B, H, W, heads, D], got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    _checks.same_device(query, "query", key=key, value=value)
    B, H, W, nh, D = query.shape
    if H < 1 or W < 1 or D < 1:  # not min(): it compares H with W under torch.export
        raise ValueError(f"query must be [B, H, W, heads, D] with H, W, D >= 1 (B and heads may be 0), "
                         f"got shape {tuple(query.shape)}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if D > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension, got strides "
                             f"{tuple(t.stride())}; call .contiguous() or slice a packed QKV tensor on dim -2 or earlier")
    kernel_size = _checks.kernel_size(kernel_size)
    border = _checks.choice(border, "border", _checks.BORDERS)
    if border == "shift" and (H < kernel_size or W < kernel_size):
        raise ValueError(f"border='shift' needs height and width >= kernel_size={kernel_size}, got {H}x{W}")
    scale = _checks.attention_scale(scale)
    return kernel_size, border, float(D ** -0.5 if scale is None else scale)


def neighborhood_attention2d(query, key, value, kernel_size=3, border="zeros", scale=None,
                             return_lse=False, backend=None):
    """Local self-attention of every cell over its kernel_size x kernel_size window
    (kernel_size 3: itself and its 8 neighbours), fused: scores, softmax and output are
    computed per window in float32, never materialised; backward recomputes them.

    For query cell (y, x), head h, window offsets (dy, dx) in row-major order
    (r = kernel_size // 2, -r <= dy, dx <= r)::

        s[dy, dx] = scale * <q[y, x], k[y + dy, x + dx]>
        o[y, x]   = sum softmax(s)[dy, dx] * v[y + dy, x + dx]

    ``border`` decides what a window reaching outside the grid sees:
        "zeros": a zero key and value (logit exactly 0, which still takes softmax mass;
            GeCA's unfold with zero padding);
        "mask": outside positions are left out of the softmax;
        "circular": the grid wraps around (torus);
        "shift": the window moves inwards to stay inside (NATTEN); needs H, W >= kernel_size.

    Args:
        query, key, value: [B, H, W, heads, D], same shape, dtype (float32/float16/bfloat16;
            float64 on "cpu"/"reference") and device; only the last dim must be contiguous,
            so q/k/v can be strided views of one packed QKV tensor (no copy is made).
            H, W, D >= 1; B and heads may be 0 (empty results).
        kernel_size: 3, 5 or 7.
        scale: logit scale, default D ** -0.5.
        return_lse: also return the log-sum-exp of each window's logits.
        backend: None (fastest usable; env FASTNCA_BACKEND overrides), "reference",
            "cpu", "cuda" or "triton".

    Returns:
        o [B, H, W, heads, D] in the input dtype; with ``return_lse`` also
        lse [B, H, W, heads] in float32 (float64 for float64 inputs).
    """
    kernel_size, border, scale = _check(query, key, value, kernel_size, border, scale)
    return_lse = _checks.boolean(return_lse, "return_lse")
    if query.shape[-1] == 1:  # a size-1 head dim is contiguous whatever its stride: make it 1
        query, key, value = (t.squeeze(-1).unsqueeze(-1) for t in (query, key, value))
    backend = _backend.backend_for_input(query, _backend.resolve(backend, "neighborhood_attention", query.device,
                                                                 query.dtype, {"shape": tuple(query.shape)}))
    args = (query, key, value, kernel_size, border, scale, backend)
    o, lse = _eager.call(_na2d_op, _NA2dFunction, _na2d, (query, key, value), args)
    return (o, lse) if return_lse else o
