"""GeCA: Generative Cellular Automata (Elbatel, Kamnitsas, Li; MICCAI 2024).

An NCA whose update rule is one DiT block with 3x3 neighbourhood self-attention,
applied 12 times to a grid of cells, used as the denoiser of a diffusion model
(see :mod:`fastnca.models.geca_diffusion`).

Cell layout (NCHW at the public interface)::

    [ x_t (in_ch = 4) | out (2 * in_ch = 8: epsilon 4, variance interpolation 4) | hidden ]

x_t channels are never updated. Seed: zeros except the out channels of the centre
cell (H // 2, W // 2), which are standard normal. One CA step::

    tokens = cell_to_embedding(cells) + pos        (1-D sinusoid over n = i * W + j)
    x = x + gate_msa * Attn(modulate(LN1(x)))      (shift/scale/gate from c = t_emb + y_emb)
    x = x + gate_mlp * MLP(modulate(LN2(x)))
    update = final_layer(x, c)                     (8 + hidden channels)
    cells[:, in_ch:] += mask * update              (mask = fastnca.fire_mask, p = 0.5)

Module and parameter names equal the authors' state-dict keys, so their
checkpoints load with :meth:`GeCA.load_original_state_dict`.

Implementation notes:
- The steps run in a channels-last cell state [B, H, W, C]: the token projection,
  the attention (heads-last [B, H, W, heads, D] q/k/v, strided views of the packed
  QKV output, no copy) and the final projection then need no transposes.
- The conditioning c is constant over the 12 steps, so both adaLN modulations are
  computed once per forward (same numbers as recomputing them every step).
- Training wraps every CA step in ``torch.utils.checkpoint`` (non-reentrant), so
  activation memory grows with one step, not twelve. Each step's fire mask (a pure
  function of seed, step and cell) is drawn outside the checkpointed function and kept
  as an input: one bool per cell and step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastnca
from fastnca import _checks
from fastnca.nn import _check_backend, _seed_or_draw, draw_seed

__all__ = [
    "GeCA",
    "GeCAConfig",
    "GeCA_XS",
    "GeCA_S",
    "geca_xs",
    "geca_s",
    "timestep_embedding",
    "position_embedding_1d",
    "draw_seed",
    # the diffusion (fastnca.models.geca_diffusion), importable from here too
    "GeCADiffusion",
    "create_diffusion",
    "space_timesteps",
    "linear_betas",
    "cfg_combine",
    "heredity_cells",
]
_DIFFUSION = frozenset(__all__[__all__.index("GeCADiffusion"):])


def __getattr__(name: str):
    # Lazy (PEP 562): geca_diffusion imports this module, so a top-level import would cycle.
    if name in _DIFFUSION:
        from . import geca_diffusion

        return getattr(geca_diffusion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class GeCAConfig:
    """Sizes of a GeCA model. ``GeCA_XS`` and ``GeCA_S`` are the paper's models."""

    embed_dim: int = 384
    heads: int = 6
    dim_head: int = 64
    mlp_dim: int = 64
    hidden_channels: int = 32
    in_channels: int = 4
    num_classes: int = 5
    ca_steps: int = 12
    update_prob: float = 0.5
    kernel_size: int = 3
    class_dropout_prob: float = 0.1
    freq_dim: int = 256

    def __post_init__(self):
        for name in ("embed_dim", "heads", "dim_head", "mlp_dim", "in_channels", "num_classes", "freq_dim"):
            _checks.integer(getattr(self, name), name, 1)
        _checks.integer(self.hidden_channels, "hidden_channels", 0)
        _checks.integer(self.ca_steps, "ca_steps", 0)
        _checks.kernel_size(self.kernel_size)
        _checks.probability(self.update_prob, "update_prob")
        _checks.probability(self.class_dropout_prob, "class_dropout_prob")

    @property
    def out_channels(self) -> int:  # epsilon + variance-interpolation values
        return 2 * self.in_channels

    @property
    def cell_channels(self) -> int:
        return self.in_channels + self.out_channels + self.hidden_channels


GeCA_XS = dict(embed_dim=384, heads=6, dim_head=64, mlp_dim=64, hidden_channels=32)
GeCA_S = dict(embed_dim=768, heads=12, dim_head=64, mlp_dim=3072, hidden_channels=64)
CONFIGS = {"GeCA-XS": GeCA_XS, "GeCA-S": GeCA_S}


def geca_xs(num_classes: int = 5, **kw) -> "GeCA":
    return GeCA(GeCAConfig(**{**GeCA_XS, "num_classes": num_classes, **kw}))


def geca_s(num_classes: int = 5, **kw) -> "GeCA":
    return GeCA(GeCAConfig(**{**GeCA_S, "num_classes": num_classes, **kw}))


# --------------------------------------------------------------------------- helpers


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features, ``[cos, sin]`` order (DiT / GLIDE convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def position_embedding_1d(n: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[n, dim] sinusoid of the original: channel c gets sin (c even) / cos (c odd) of
    ``pos * exp(-ln(1e4) * c / dim)`` -- the odd channel uses its own index c, not c - 1."""
    pos = torch.arange(n, dtype=torch.float32, device=device)[:, None]
    c = torch.arange(dim, dtype=torch.float32, device=device)[None]
    ang = pos * torch.exp(-math.log(10000.0) * c / dim)
    pe = torch.where((torch.arange(dim, device=device) % 2 == 0)[None], torch.sin(ang), torch.cos(ang))
    return pe.to(dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# --------------------------------------------------------------------------- modules


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Multi-hot labels -> Linear(ncls, D) -> Linear(D, D) (no activation between).
    Training drops individual label entries with probability ``dropout_prob``
    (classifier-free guidance; the null label is all zeros)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Sequential(nn.Linear(num_classes, dim), nn.Linear(dim, dim))

    def forward(self, y: torch.Tensor, train: bool | None = None) -> torch.Tensor:
        y = y.to(self.embedding_table[0].weight.dtype)
        if (self.training if train is None else train) and self.dropout_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout_prob
            y = y.masked_fill(drop, 0)
        return self.embedding_table(y)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.fn = fn


class LocalAttention(nn.Module):
    """QKV (no bias) -> 3x3 neighbourhood attention (zero keys outside the grid) -> to_out."""

    def __init__(self, dim: int, heads: int, dim_head: int, kernel_size: int = 3):
        super().__init__()
        self.heads, self.dim_head, self.kernel_size = heads, dim_head, kernel_size
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        # x: [B, H, W, D]. q/k/v are views of the packed projection: [B, H, W, heads, Dh]
        # with the channel order (3, heads, Dh) of the original's chunk + rearrange.
        B, H, W, _ = x.shape
        qkv = self.to_qkv(x).view(B, H, W, 3, self.heads, self.dim_head)
        q, k, v = qkv.unbind(3)
        o = fastnca.neighborhood_attention2d(q, k, v, kernel_size=self.kernel_size, border="zeros",
                                             backend=backend)
        return self.to_out(o.reshape(B, H, W, self.heads * self.dim_head))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim),
                                 nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """The single DiT block, with ONE adaLN modulation shared by attention and MLP."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, kernel_size: int = 3):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([
                PreNorm(dim, LocalAttention(dim, heads, dim_head, kernel_size)),
                PreNorm(dim, FeedForward(dim, mlp_dim)),
            ])
        ])
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, mod: tuple, backend: str | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        for attn, ff in self.layers:
            x = x + gate_msa * attn.fn(modulate(attn.norm(x), shift_msa, scale_msa), backend=backend)
            x = x + gate_mlp * ff.fn(modulate(ff.norm(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, mod: tuple) -> torch.Tensor:
        shift, scale = mod
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------- model


class GeCA(nn.Module):
    """GeCA denoiser. ``forward(x, t, y)`` returns the out channels [B, 2*in_ch, H, W]
    (epsilon | variance values) of the cell state after ``ca_steps`` updates.

    Args:
        config: a :class:`GeCAConfig` (or pass its fields as keyword arguments).
        checkpoint_steps: recompute each CA step in backward while training
            (``torch.utils.checkpoint``, non-reentrant). Set False to store activations.
        backend: attention / fire-mask backend passed to the fastnca ops (None = auto).
    """

    def __init__(self, config: GeCAConfig | None = None, *, checkpoint_steps: bool = True,
                 backend: str | None = None, **kw):
        super().__init__()
        if config is not None and kw:
            raise TypeError("pass either a GeCAConfig or keyword sizes, not both")
        if config is not None and not isinstance(config, GeCAConfig):
            raise TypeError(f"config must be a GeCAConfig (or pass the sizes as keywords: GeCA(**d)), "
                            f"got {type(config).__name__}")
        _check_backend(backend)
        cfg = config if config is not None else GeCAConfig(**kw)
        self.config = cfg
        self.checkpoint_steps = checkpoint_steps
        self.backend = backend
        D = cfg.embed_dim
        self.in_channels, self.out_channels = cfg.in_channels, cfg.out_channels
        self.hidden_channels, self.cell_channels = cfg.hidden_channels, cfg.cell_channels
        self.t_embedder = TimestepEmbedder(D, cfg.freq_dim)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        self.cell_to_embedding = nn.Linear(cfg.cell_channels, D)
        self.transformer = Transformer(D, cfg.heads, cfg.dim_head, cfg.mlp_dim, cfg.kernel_size)
        self.final_layer = FinalLayer(D, cfg.out_channels + cfg.hidden_channels)
        self._pos_cache: dict = {}
        self.reset_parameters()

    # ------------------------------------------------------------------ init / io

    def reset_parameters(self) -> None:
        """DiT initialisation: xavier-uniform linears with zero bias, normal(0.02)
        timestep MLP, zero adaLN linears and zero final linear (a fresh model is the
        identity on the cells)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for lin in (self.transformer.adaLN_modulation[-1], self.final_layer.adaLN_modulation[-1],
                    self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def load_original_state_dict(self, sd: dict, key: str = "ema", strict: bool = True):
        """Load weights saved by the authors' code: a bare state dict or a training
        checkpoint ``{"model", "ema", "opt", "args"}`` (``key`` picks one; default EMA).
        A ``module.`` prefix (DDP) is stripped. A training checkpoint without ``key`` is an
        error, not a silent load of its other weights (EMA and raw weights sample differently)."""
        nested = [k for k in ("model", "ema") if isinstance(sd, dict) and isinstance(sd.get(k), dict)]
        if nested:
            if key not in nested:
                raise KeyError(f"load_original_state_dict: the checkpoint has no {key!r} weights, only "
                               f"{nested}; pass key={nested[0]!r}")
            sd = sd[key]
        sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
        return self.load_state_dict(sd, strict=strict)

    def extra_repr(self) -> str:
        c = self.config
        return (f"D={c.embed_dim}, heads={c.heads}x{c.dim_head}, mlp={c.mlp_dim}, cells={c.in_channels}+"
                f"{c.out_channels}+{c.hidden_channels}, classes={c.num_classes}, steps={c.ca_steps}, "
                f"update_prob={c.update_prob}")

    # ------------------------------------------------------------------ cells

    def seed_cells(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Seed state for noisy inputs x [B, in_ch, H, W]: [x | 0 ... | 0] with standard
        normal out channels at the centre cell (H // 2, W // 2)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, in_channels={self.in_channels}, H, W], got {tuple(x.shape)}")
        B, _, H, W = x.shape
        cells = x.new_zeros(B, self.cell_channels, H, W)
        cells[:, : self.in_channels] = x
        noise = torch.randn(B, self.out_channels, generator=generator,
                            device=generator.device if generator is not None else x.device)
        cells[:, self.in_channels: self.in_channels + self.out_channels, H // 2, W // 2] = noise.to(x)
        return cells

    def _pos(self, H: int, W: int, device, dtype) -> torch.Tensor:
        key = (H, W, str(device), dtype)
        pe = self._pos_cache.get(key)
        if pe is None:
            # Built outside inference mode: a table made under torch.inference_mode() (a
            # validation pass) could not be saved for backward by a later training step.
            with torch.inference_mode(False):
                pe = position_embedding_1d(H * W, self.config.embed_dim, device, dtype).view(H, W, -1)
            self._pos_cache = {key: pe}
        return pe

    def _conditioning(self, t, y, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t as [B] on the cells' device (a number or a 0-dim / one-element tensor is
        broadcast); y checked to be [B, ncls] on that device."""
        B, device = cells.shape[0], cells.device
        try:
            t = torch.as_tensor(t, device=device)
        except (TypeError, RuntimeError, ValueError):
            raise TypeError(f"t must be timesteps (a tensor, a number or a sequence of numbers), "
                            f"got {type(t).__name__}") from None
        if t.dim() == 0 or t.shape == (1,):
            t = t.reshape(1).expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be [B] = [{B}] timesteps (or one for the batch), got shape {tuple(t.shape)}")
        ncls = self.config.num_classes
        if not isinstance(y, torch.Tensor) or y.shape != (B, ncls):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must be [B, num_classes] = [{B}, {ncls}] multi-hot labels, got {got}")
        _checks.same_device(cells, "cells", y=y)
        return t, y

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c = t_emb(t) + y_emb(y) [B, D] (label dropout applies in training mode)."""
        return self.t_embedder(t) + self.y_embedder(y)

    def _step(self, cells: torch.Tensor, mask: torch.Tensor | None, mods: tuple, pos: torch.Tensor,
              ) -> torch.Tensor:
        # cells: [B, H, W, C] (any strides); mask: [B, H, W] bool or None (all update).
        x = self.cell_to_embedding(cells) + pos
        x = self.transformer(x, mods[0], backend=self.backend)
        update = self.final_layer(x, mods[1])
        keep = cells[..., : self.in_channels]
        live = cells[..., self.in_channels:]
        if mask is not None:
            update = update * mask.unsqueeze(-1).to(update.dtype)
        return torch.cat([keep, live + update], dim=-1)

    def _check_input(self, x, name: str) -> None:
        """x or cells: a 4-D tensor of the model's device and dtype (or under autocast), H, W >= 1."""
        _checks.tensor(x, name, ndim=4)
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"{name} must have H, W >= 1, got shape {tuple(x.shape)}")
        w = self.cell_to_embedding.weight
        _checks.same_device(w, "the model", **{name: x})
        _checks.parameter_dtype(x, name, w.dtype, "model")

    def evolve(self, cells: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, steps: int | None = None,
               seed: int | None = None, update_prob: float | None = None) -> torch.Tensor:
        """Run the CA from ``cells`` [B, C, H, W] for ``steps`` (default 12) steps with
        conditioning (t, y); returns the final cells [B, C, H, W] (channels-last memory).
        Step i uses ``fastnca.fire_mask(B, H, W, update_prob, seed, step=i)``; ``seed``
        defaults to a draw from torch's default generator."""
        cfg = self.config
        self._check_input(cells, "cells")
        B, C, H, W = cells.shape
        if C != cfg.cell_channels:
            raise ValueError(f"cells have {C} channels, GeCA expects {cfg.cell_channels} "
                             f"({cfg.in_channels} x_t + {cfg.out_channels} out + {cfg.hidden_channels} hidden)")
        t, y = self._conditioning(t, y, cells)
        steps = cfg.ca_steps if steps is None else _checks.integer(steps, "steps", 0)
        p = cfg.update_prob if update_prob is None else _checks.probability(update_prob, "update_prob")
        if p < 1.0:
            seed = _seed_or_draw(seed, "GeCA.evolve")
        c = self.condition(t, y)
        D = cfg.embed_dim
        m = self.transformer.adaLN_modulation(c).view(B, 1, 1, 6 * D).chunk(6, dim=-1)
        f = self.final_layer.adaLN_modulation(c).view(B, 1, 1, 2 * D).chunk(2, dim=-1)
        mods = (m, f)
        pos = self._pos(H, W, cells.device, self.cell_to_embedding.weight.dtype)
        state = cells.permute(0, 2, 3, 1)
        ckpt = self.checkpoint_steps and self.training and torch.is_grad_enabled()
        for i in range(steps):
            mask = None if p >= 1.0 else fastnca.fire_mask(B, H, W, p, seed, step=i, device=cells.device,
                                                           backend=self.backend)
            if ckpt:
                state = checkpoint(self._step, state, mask, mods, pos, use_reentrant=False)
            else:
                state = self._step(state, mask, mods, pos)
        return state.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, cells: torch.Tensor | None = None,
                steps: int | None = None, seed: int | None = None, update_prob: float | None = None,
                return_cells: bool = False):
        """Denoiser call. x: noisy input [B, in_ch, H, W]; t: [B] timesteps; y: [B, ncls]
        multi-hot labels. ``cells`` (optional, [B, C, H, W]) is the starting state whose
        x_t channels are replaced by x (Gene Heredity Guidance); default: the seed.
        Returns the out channels [B, 2*in_ch, H, W], plus the final cells if ``return_cells``."""
        self._check_input(x, "x")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, {self.in_channels}, H, W] (the model's in_channels), "
                             f"got shape {tuple(x.shape)}")
        if cells is None:
            cells = self.seed_cells(x)
        else:
            _checks.tensor(cells, "cells", ndim=4)
            if cells.shape[0] != x.shape[0] or cells.shape[2:] != x.shape[2:]:
                B, _, H, W = x.shape
                raise ValueError(f"cells must be [{B}, C, {H}, {W}] like x, got shape {tuple(cells.shape)}")
            cells = torch.cat([x.to(cells.dtype), cells[:, self.in_channels:]], dim=1)
        final = self.evolve(cells, t, y, steps=steps, seed=seed, update_prob=update_prob)
        out = final[:, self.in_channels: self.in_channels + self.out_channels]
        return (out, final) if return_cells else out
