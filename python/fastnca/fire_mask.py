"""``fastnca.fire_mask``: the stochastic update mask of an NCA step.

A pure function of (seed, step, b, y, x) -- Philox4x32-10 keyed by the seed, counter
(cell index, step) -- bit-identical on every backend, so fused kernels draw it in
registers and backward regenerates it instead of storing it (as FlashAttention does with
dropout).
"""

import torch

from . import _backend, _checks

# Devices outside cpu / cuda / meta that torch has allocated on once (fire_mask probes each
# such device the first time it is asked for it, not on every call).
_ALLOCATABLE: set[torch.device] = set()


@torch.library.custom_op("fastnca::fire_mask", mutates_args=())
def _fire_mask_op(
    batch: int, height: int, width: int, update_prob: float, seed: int, step: int,
    device: torch.device, backend: str,
) -> torch.Tensor:
    kernel = _backend.kernel(backend, "fire_mask")
    return kernel.fire_mask(batch, height, width, update_prob, _checks.seed_from_i64(seed), step, device)


@_fire_mask_op.register_fake
def _(batch, height, width, update_prob, seed, step, device, backend):
    return torch.empty(batch, height, width, dtype=torch.bool, device=device)


def fire_mask(
    batch: int, height: int, width: int, update_prob: float, seed: int, step: int = 0,
    device: torch.device | str | None = None, backend: str | None = None,
) -> torch.Tensor:
    """Bool mask [batch, height, width]: True where a cell updates at ``step``.

    Cell (b, y, x) updates iff ``u < update_prob``, with u the top 24 bits of Philox4x32-10
    output word 0 (key = seed, counter = ((b*H + y)*W + x, step mod 2^32)) times 2^-24. The
    mask is a pure function of these arguments: bit-identical on every backend and device,
    and what :func:`nca_step` draws inside its kernels.

    Args:
        batch, height, width: mask shape (>= 0).
        update_prob: probability that a cell updates, in [0, 1] (Med-NCA's ``fire_rate``
            is the probability that it does NOT: pass ``1 - fire_rate``).
        seed: int in [0, 2^64).
        step: int >= 0; only its low 32 bits enter the counter.
        device: where the mask is made; default torch's default device (``torch.set_default_device``
            or ``with torch.device(...)``).
        backend: None (fastest usable), "reference", "cpu", "cuda" or "triton".
    """
    batch = _checks.integer(batch, "batch", 0)
    height = _checks.integer(height, "height", 0)
    width = _checks.integer(width, "width", 0)
    # cell indices stay well inside int64, and so do the strides of an empty mask (a size 0
    # must not let the others through)
    if max(batch, 1) * max(height, 1) * max(width, 1) >= 1 << 62:
        raise ValueError(f"fire_mask: batch * height * width (sizes 0 taken as 1) must be < 2^62 cells, "
                         f"got {batch}x{height}x{width}")
    update_prob = _checks.probability(update_prob, "update_prob")
    seed = _checks.seed(seed)
    step = _checks.step_counter(step)
    if device is None:  # a factory call's device: traceable, and right on torch < 2.8, whose
        device = torch.empty(0).device  # get_default_device() ignores `with torch.device(...)`
    else:
        if not isinstance(device, (torch.device, str)):
            raise TypeError(f"fire_mask: device must be a torch.device, a device string or None, "
                            f"got {type(device).__name__}")
        try:
            device = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"fire_mask: device {device!r} is not a device torch knows ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"fire_mask: device {device} requested, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda", "meta") and device not in _ALLOCATABLE:
        try:
            torch.empty(0, device=device)
        except (RuntimeError, NotImplementedError) as e:
            raise RuntimeError(f"fire_mask: device {device} requested, but torch cannot allocate there "
                               f"({type(e).__name__})") from None
        _ALLOCATABLE.add(device)
    backend = _backend.resolve(backend, "fire_mask", device)
    return _fire_mask_op(batch, height, width, update_prob, _checks.seed_to_i64(seed), step, device, backend)
