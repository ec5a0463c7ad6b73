"""``torch.nn`` modules over the fastnca ops."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _backend, _checks
from .nca_step import nca_rollout
from .neighborhood_attention import neighborhood_attention2d


def _check_dtype(dtype) -> None:
    """A module's parameter dtype: None (torch's default) or a floating-point dtype."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating-point torch.dtype, got {dtype}")


def _check_backend(backend) -> None:
    if backend is not None:
        _backend.check_name(backend)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A 63-bit fire-mask seed from ``generator`` (default: torch's default CPU generator,
    so ``torch.manual_seed`` repeats runs)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=generator, device=device).item())


def _seed_or_draw(seed: int | None, module: str, generator: torch.Generator | None = None) -> int:
    """A module's fire-mask seed: ``seed``, or a :func:`draw_seed` from ``generator``. Under
    torch.compile a draw cannot be traced (it reads a tensor back to Python: a graph break,
    or under fullgraph=True an error on a data-dependent guard that did not say what to do),
    so there a missing seed raises."""
    if seed is not None:
        return seed
    if torch.compiler.is_compiling():
        raise RuntimeError(f"{module} under torch.compile needs seed=...: drawing one reads a "
                           "tensor back to Python")
    return draw_seed(generator)


def _check_state(state: torch.Tensor, channels: int, module: str) -> None:
    _checks.tensor(state, "state")
    if state.dim() != 4 or state.shape[1] != channels:
        raise ValueError(f"state must have shape [B, {channels}, H, W] (this {module}'s channels), "
                         f"got {tuple(state.shape)}")


class NCA(nn.Module):
    """An NCA update rule: 3x3 perception (F filter banks, full or depthwise), per-cell
    MLP (fc1 + ReLU + fc2), stochastic residual update; ``forward`` runs a checkpointed
    rollout.

    Args:
        channels: cell channels C.
        hidden: hidden width of the per-cell MLP.
        filters: F, perception filter banks per channel (Med-NCA: 2).
        groups: 1 (full 3x3 convs, Med-NCA) or ``channels`` (depthwise, Growing-NCA style).
        padding: "reflect", "zeros", "circular" or "replicate".
        update_prob: probability that a cell updates at a step.
        frozen_channels: leading channels never updated (e.g. the input image).
        fc2_bias: whether fc2 has a bias (Med-NCA: no).
        checkpoint_every: rollout checkpoint interval (default ceil(sqrt(steps))).
        backend: fastnca backend, None to auto-select.
    """

    def __init__(self, channels: int, hidden: int = 128, filters: int = 2, groups: int = 1,
                 padding: str = "reflect", update_prob: float = 0.5, frozen_channels: int = 0,
                 fc2_bias: bool = False, checkpoint_every: int | None = None,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        channels = _checks.integer(channels, "channels", 1)
        hidden = _checks.integer(hidden, "hidden", 1)
        filters = _checks.integer(filters, "filters", 1)
        groups = _checks.groups(groups, channels)
        padding = _checks.choice(padding, "padding", _checks.PADDINGS)
        update_prob = _checks.probability(update_prob, "update_prob")
        frozen_channels = _checks.integer(frozen_channels, "frozen_channels", 0, channels + 1)
        if checkpoint_every is not None:
            checkpoint_every = _checks.integer(checkpoint_every, "checkpoint_every", 1)
        _check_backend(backend)
        _check_dtype(dtype)
        kw = {"device": device, "dtype": dtype}
        self.channels, self.hidden, self.filters, self.groups = channels, hidden, filters, groups
        self.padding, self.update_prob, self.frozen_channels = padding, update_prob, frozen_channels
        self.checkpoint_every, self.backend = checkpoint_every, backend
        fan_in = 9 * channels // groups
        bound = 1 / math.sqrt(fan_in)
        self.perception_weight = nn.Parameter(torch.empty(filters * channels, channels // groups, 3, 3, **kw).uniform_(-bound, bound))
        self.perception_bias = nn.Parameter(torch.empty(filters * channels, **kw).uniform_(-bound, bound))
        fc1 = nn.Linear((filters + 1) * channels, hidden, **kw)
        self.fc1_weight, self.fc1_bias = fc1.weight, fc1.bias
        # Zero-initialised output layer: a fresh rule leaves the state unchanged.
        self.fc2_weight = nn.Parameter(torch.zeros(channels - frozen_channels, hidden, **kw))
        self.fc2_bias = nn.Parameter(torch.zeros(channels - frozen_channels, **kw)) if fc2_bias else None

    def forward(self, state: torch.Tensor, steps: int, seed: int | None = None,
                start_step: int = 0) -> torch.Tensor:
        """Run ``steps`` update steps on ``state`` [B, C, H, W] (:func:`fastnca.nca_rollout`).

        ``seed`` keys the update masks (None: drawn from torch's default generator, so
        ``torch.manual_seed`` repeats runs); step i draws its mask with counter
        ``start_step + i``, so a rollout continued from ``start_step=steps`` equals one
        longer rollout. Under ``torch.compile`` pass ``seed``: drawing one reads a tensor
        back to Python, so without it the call falls back to eager (a graph break), and
        ``fullgraph=True`` raises."""
        _check_state(state, self.channels, "NCA")
        seed = _seed_or_draw(seed, "NCA.forward")
        return nca_rollout(
            state, self.perception_weight, self.perception_bias, self.fc1_weight, self.fc1_bias,
            self.fc2_weight, self.fc2_bias, steps=steps, start_step=start_step,
            checkpoint_every=self.checkpoint_every, groups=self.groups, padding=self.padding,
            update_prob=self.update_prob, seed=seed,
            frozen_channels=self.frozen_channels, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, hidden={self.hidden}, filters={self.filters}, "
                f"groups={self.groups}, padding={self.padding!r}, update_prob={self.update_prob}, "
                f"frozen_channels={self.frozen_channels}")


class NeighborhoodAttention2d(nn.Module):
    """QKV projection, neighbourhood attention, output projection over [B, H, W, dim].

    q, k and v are strided views of the one packed QKV output (no copies).
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 3, border: str = "zeros",
                 qkv_bias: bool = False, proj_bias: bool = True, scale: float | None = None,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        dim = _checks.integer(dim, "dim", 1)
        num_heads = _checks.integer(num_heads, "num_heads", 1)
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        kernel_size = _checks.kernel_size(kernel_size)
        border = _checks.choice(border, "border", _checks.BORDERS)
        scale = _checks.attention_scale(scale)
        _check_backend(backend)
        _check_dtype(dtype)
        kw = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.kernel_size, self.border, self.scale, self.backend = kernel_size, border, scale, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **kw)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, W, dim] -> [B, H, W, dim]: QKV projection, neighbourhood attention over
        strided views of the packed QKV (no copy), output projection."""
        _checks.tensor(x, "x")
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, H, W, {self.dim}], got {tuple(x.shape)}")
        _checks.parameter_dtype(x, "x", self.qkv.weight.dtype, "module")
        B, H, W, _ = x.shape
        q, k, v = self.qkv(x).view(B, H, W, 3, self.num_heads, self.head_dim).unbind(3)
        o = neighborhood_attention2d(q, k, v, self.kernel_size, self.border, self.scale,
                                     backend=self.backend)
        return self.proj(o.reshape(B, H, W, self.dim))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"border={self.border!r}")
