"""Med-NCA (Kalkhof et al., IPMI 2023) on top of ``fastnca.nca_rollout``.

Two BackboneNCAs: level 0 runs on the image downscaled by ``downscale`` (4), its
state is upsampled (nearest) to full resolution, channel 0 is replaced by the
full-resolution image, and level 1 continues from there. The segmentation logit is
channel ``input_channels`` (1). The authors' conventions, which this module
reproduces, are summarised in ``shared/seeds/MEDNCA.md``:

- one step: perception ``cat(x, p0(x), p1(x))`` with two full 3x3 convolutions
  (reflect padding, bias), ``fc0`` (bias) -> ReLU -> ``fc1`` (no bias,
  zero-initialised); the update is masked per cell with probability
  ``1 - fire_rate`` and the image channel is kept frozen;
- the original keeps the state channels-last ``[B, H, W, C]`` and applies the convs
  after ``transpose(1, 3)``, i.e. on the W,H-transposed grid. Our state is NCHW on
  the untransposed grid, so :meth:`MedNCA.from_original` transposes each 3x3
  kernel spatially on load; the fully-connected part is per cell and unchanged.

The fire mask is fastnca's counter-based Philox mask (``update_prob = 1 -
fire_rate``), not ``torch.rand``: results match the original in distribution, not
bit for bit (the Dice over mask seeds is the comparison, see the tests).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fastnca
from fastnca import _checks
from fastnca.nn import _check_state, _seed_or_draw

__all__ = [
    "BackboneNCA",
    "MedNCA",
    "EnsembleResult",
    "dice_bce_loss",
    "soft_dice",
    "downscale",
    "resize_cubic",
    "resize_nearest",
    "preprocess_slice",
    "preprocess_volume",
    "synthetic_ellipses",
]


# --------------------------------------------------------------------------- backbone


_ORIGINAL_KEYS = ("p0.weight", "p0.bias", "p1.weight", "p1.bias", "fc0.weight", "fc0.bias", "fc1.weight")
# The original fc1 is Linear(hidden, C, bias=False). An all-zero fc1.bias is accepted
# (dropping it changes nothing), so it is the one key allowed beyond _ORIGINAL_KEYS.
_ORIGINAL_OPTIONAL_KEYS = ("fc1.bias",)


def _check_original_state_dict(sd, what: str) -> None:
    """Raise unless ``sd`` holds an original Med-NCA BackboneNCA's weights and nothing else
    (naming the loader of a fastnca checkpoint when it is one).

    Unexpected keys are refused, not ignored: weights the model has no place for (a
    ``bn.weight``, a third perception ``p2.weight``) mean another architecture, and
    loading the rest would run a different model silently. Everything here depends on
    ``sd`` alone, so the loaders run it before they copy anything.
    """
    missing = [k for k in _ORIGINAL_KEYS if not isinstance(sd, dict) or k not in sd]
    if missing:
        hint = (" (a fastnca checkpoint: load it with MedNCA.load)"
                if isinstance(sd, dict) and sd.get("format") == "fastnca.mednca" else "")
        raise ValueError(f"{what} is not an original Med-NCA level state dict: missing {', '.join(missing)}{hint}")
    unexpected = [k for k in sd if k not in _ORIGINAL_KEYS + _ORIGINAL_OPTIONAL_KEYS]
    if unexpected:
        raise ValueError(f"{what} is not an original Med-NCA level state dict: unexpected "
                         f"{', '.join(map(str, unexpected))} (expected exactly {', '.join(_ORIGINAL_KEYS)}, "
                         "and optionally an all-zero fc1.bias)")
    for k in _ORIGINAL_KEYS + _ORIGINAL_OPTIONAL_KEYS:
        if k in sd and not isinstance(sd[k], torch.Tensor):
            raise TypeError(f"{what}: {k} must be a torch.Tensor, got {type(sd[k]).__name__}")
    if "fc1.bias" in sd and torch.any(sd["fc1.bias"] != 0):
        raise ValueError(f"{what} has a nonzero fc1.bias, but the original fc1 has no bias "
                         "(dropping it would change the model silently)")


# The authors' packaged MedNCA module holds the two levels as these submodules.
_PACKAGED = ("backbone_lowres.", "backbone_highres.")


def _is_packaged(sd) -> bool:
    """Whether ``sd`` is the authors' packaged MedNCA state dict (both levels in one)."""
    return isinstance(sd, dict) and any(str(k).startswith(_PACKAGED[0]) for k in sd)


def _packaged_levels(sd, what: str) -> tuple[list, list]:
    """The two level state dicts of the authors' packaged MedNCA state dict, and names for
    them in errors; every key must belong to one of the two levels."""
    if not _is_packaged(sd):
        raise ValueError(f"{what}: one file holds both levels only as the authors' packaged MedNCA state dict "
                         f"(keys {_PACKAGED[0]}* and {_PACKAGED[1]}*); for per-level files (model0.pth, "
                         "model1.pth) pass both paths")
    stray = [k for k in sd if not str(k).startswith(_PACKAGED)]
    if stray:
        raise ValueError(f"{what}: keys outside {_PACKAGED[0]}* and {_PACKAGED[1]}*: {', '.join(map(str, stray))}")
    levels = [{k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)} for pre in _PACKAGED]
    return levels, [f"{what} ({pre[:-1]})" for pre in _PACKAGED]


class BackboneNCA(nn.Module):
    """One Med-NCA level: ``steps`` NCA updates of a ``[B, C, H, W]`` state.

    Parameters in fastnca layout (the original ``p0, p1, fc0, fc1`` in brackets):

    - ``perception_weight`` [2C, C, 3, 3] (``cat(p0.weight, p1.weight)``, kernels
      given on our NCHW grid), ``perception_bias`` [2C];
    - ``fc1_weight`` [hidden, 3C], ``fc1_bias`` [hidden] (``fc0``);
    - ``fc2_weight`` [C, hidden], zero-initialised, no bias (``fc1``). Row ``c <
      input_channels`` is kept (the paper counts it) but never used: those channels
      are frozen.

    35,008 parameters for C=32, hidden=128.
    """

    def __init__(
        self,
        channels: int = 32,
        hidden: int = 128,
        fire_rate: float = 0.5,
        input_channels: int = 1,
        padding: str = "reflect",
        checkpoint_every: int | None = None,
    ):
        super().__init__()
        channels = _checks.integer(channels, "channels", 1)
        hidden = _checks.integer(hidden, "hidden", 1)
        input_channels = _checks.integer(input_channels, "input_channels", 0, channels)
        fire_rate = _checks.probability(fire_rate, "fire_rate")
        padding = _checks.choice(padding, "padding", _checks.PADDINGS)
        if checkpoint_every is not None:
            checkpoint_every = _checks.integer(checkpoint_every, "checkpoint_every", 1)
        self.channels = channels
        self.hidden = hidden
        self.fire_rate = fire_rate
        self.input_channels = input_channels
        self.padding = padding
        self.checkpoint_every = checkpoint_every
        C = channels
        self.perception_weight = nn.Parameter(torch.empty(2 * C, C, 3, 3))
        self.perception_bias = nn.Parameter(torch.empty(2 * C))
        self.fc1_weight = nn.Parameter(torch.empty(hidden, 3 * C))
        self.fc1_bias = nn.Parameter(torch.empty(hidden))
        self.fc2_weight = nn.Parameter(torch.zeros(C, hidden))
        self.reset_parameters()

    @property
    def update_prob(self) -> float:
        return 1.0 - self.fire_rate

    def reset_parameters(self) -> None:
        # PyTorch's Conv2d / Linear defaults, as in the original (p0 and p1 share fan-in).
        for w, b in ((self.perception_weight, self.perception_bias), (self.fc1_weight, self.fc1_bias)):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            fan_in = w[0].numel()
            nn.init.uniform_(b, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))
        nn.init.zeros_(self.fc2_weight)

    def forward(
        self,
        state: torch.Tensor,
        steps: int,
        seed: int | None = None,
        start_step: int = 0,
        backend: str | None = None,
    ) -> torch.Tensor:
        """Run ``steps`` updates on ``state`` [B, C, H, W] (any memory format).

        Mask of step i: ``fastnca.fire_mask(..., seed, start_step + i)``. The rollout
        is checkpointed by ``fastnca.nca_rollout`` (``checkpoint_every``).
        """
        _check_state(state, self.channels, "BackboneNCA")
        seed = _seed_or_draw(seed, "BackboneNCA.forward")
        return fastnca.nca_rollout(
            state,
            self.perception_weight,
            self.perception_bias,
            self.fc1_weight,
            self.fc1_bias,
            self.fc2_weight,
            None,
            steps=steps,
            start_step=start_step,
            checkpoint_every=self.checkpoint_every,
            groups=1,
            padding=self.padding,
            update_prob=self.update_prob,
            seed=seed,
            frozen_channels=self.input_channels,
            backend=backend,
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden={self.hidden}, fire_rate={self.fire_rate}, "
            f"input_channels={self.input_channels}, padding={self.padding!r}"
        )

    @torch.no_grad()
    def load_original_state_dict(self, sd: dict) -> None:
        """Load an original Med-NCA BackboneNCA state dict (``p0, p1, fc0, fc1``).

        The original convs act on the W,H-transposed grid: transposing each 3x3
        kernel spatially gives the same map on our untransposed NCHW grid.

        All or nothing: the keys, the fc1 bias and every shape are checked before the
        first parameter is written, so a refused state dict leaves the module as it was.
        """
        _check_original_state_dict(sd, "the state dict")
        C, h = self.channels, self.hidden
        shapes = {"p0.weight": (C, C, 3, 3), "p0.bias": (C,), "p1.weight": (C, C, 3, 3), "p1.bias": (C,),
                  "fc0.weight": (h, 3 * C), "fc0.bias": (h,), "fc1.weight": (C, h)}
        for key, shape in shapes.items():
            if tuple(sd[key].shape) != shape:
                raise ValueError(f"the state dict's {key} has shape {tuple(sd[key].shape)}, this BackboneNCA "
                                 f"(channels={C}, hidden={h}) needs {shape}")
        pw = torch.cat([sd["p0.weight"], sd["p1.weight"]], 0).transpose(-1, -2)
        pb = torch.cat([sd["p0.bias"], sd["p1.bias"]], 0)
        for param, value in (
            (self.perception_weight, pw),
            (self.perception_bias, pb),
            (self.fc1_weight, sd["fc0.weight"]),
            (self.fc1_bias, sd["fc0.bias"]),
            (self.fc2_weight, sd["fc1.weight"]),
        ):
            param.copy_(value)


# --------------------------------------------------------------------------- two-level model


def downscale(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear (align_corners=False, no antialias) downscale by an integer factor.

    What the original's linear resampler does; for factor 4 each output pixel is the
    mean of the centre 2x2 pixels of its 4x4 block.
    """
    if factor == 1:
        return image
    H, W = image.shape[-2:]
    return F.interpolate(image, size=(H // factor, W // factor), mode="bilinear", align_corners=False)


class EnsembleResult(NamedTuple):
    mean: torch.Tensor  # [B, out, H, W] mean probability over the ensemble
    std: torch.Tensor  # [B, out, H, W] standard deviation of the probability
    score: torch.Tensor  # [B] sum(std) / sum(mean): higher = less reliable (M3D-NCA)


class MedNCA(nn.Module):
    """Two-level Med-NCA.

    ``forward(image)`` takes the full-resolution image [B, input_channels, H, W]
    (H, W divisible by ``downscale``) and returns the logits [B, output_channels, H, W].
    ``forward_patch(image, target, patch_size)`` is the paper's memory-saving
    training mode: level 1 runs on one random patch per image, gradients reach level
    0 through the patch and the nearest upsampling.
    """

    def __init__(
        self,
        channels: int = 32,
        hidden: int = 128,
        fire_rate: float = 0.5,
        steps: int | Sequence[int] = 64,
        downscale: int = 4,
        input_channels: int = 1,
        output_channels: int = 1,
        checkpoint_every: int | None = None,
    ):
        super().__init__()
        channels = _checks.integer(channels, "channels", 1)
        input_channels = _checks.integer(input_channels, "input_channels", 0)
        output_channels = _checks.integer(output_channels, "output_channels", 1)
        if input_channels + output_channels > channels:
            raise ValueError(f"input_channels + output_channels must not exceed channels={channels}, "
                             f"got {input_channels} + {output_channels}")
        if isinstance(steps, (list, tuple)):
            if len(steps) != 2:
                raise ValueError(f"steps must be one int or one per level (2), got {steps!r}")
            steps = tuple(_checks.integer(s, "steps", 0) for s in steps)
        else:
            steps = (_checks.integer(steps, "steps", 0),) * 2
        self.steps = steps
        self.downscale = _checks.integer(downscale, "downscale", 1)
        self.input_channels = input_channels
        self.output_channels = output_channels
        kw = dict(channels=channels, hidden=hidden, fire_rate=fire_rate, input_channels=input_channels,
                  checkpoint_every=checkpoint_every)
        self.backbones = nn.ModuleList([BackboneNCA(**kw), BackboneNCA(**kw)])
        self._config = dict(kw, steps=list(steps), downscale=self.downscale, output_channels=output_channels)

    @property
    def config(self) -> dict:
        return dict(self._config)

    @property
    def channels(self) -> int:
        return self.backbones[0].channels

    # -- helpers
    def _seed_state(self, image: torch.Tensor) -> torch.Tensor:
        B, _, H, W = image.shape
        dtype = image.dtype
        if _checks.autocast_on(image.device):
            # the NCA state itself goes to the autocast dtype (the kernels compute in fp32)
            dtype = torch.get_autocast_dtype(image.device.type)
        state = image.new_zeros(B, self.channels, H, W, dtype=dtype).contiguous(memory_format=torch.channels_last)
        state[:, : self.input_channels] = image
        return state

    def _check_image(self, image: torch.Tensor) -> None:
        _checks.tensor(image, "image")
        _checks.floating(image, "image")
        if image.dim() != 4 or image.shape[1] != self.input_channels:
            raise ValueError(f"image must be [B, {self.input_channels}, H, W], got {tuple(image.shape)}")
        H, W = image.shape[-2:]
        f = self.downscale
        if H % f or W % f or H // f < 2 or W // f < 2:
            raise ValueError(f"image H, W must be multiples of downscale={f} with H/{f}, W/{f} >= 2, got {H}x{W}")

    def _level0(self, image, seed, backend):
        state0 = self._seed_state(downscale(image, self.downscale))
        return self.backbones[0](state0, self.steps[0], seed=seed, start_step=0, backend=backend)

    def _level1(self, state, image, seed, backend):
        # channel swap: the full-resolution image replaces the upsampled low-res one
        state = torch.cat([image.to(state.dtype), state[:, self.input_channels:]], 1)
        state = state.contiguous(memory_format=torch.channels_last)
        # level 1 continues the step counter so its masks differ from level 0's
        return self.backbones[1](state, self.steps[1], seed=seed, start_step=self.steps[0], backend=backend)

    def _logits(self, state):
        return state[:, self.input_channels : self.input_channels + self.output_channels]

    # -- modes
    def forward(self, image: torch.Tensor, seed: int | None = None, backend: str | None = None,
                return_state: bool = False) -> torch.Tensor:
        """Full-resolution inference/training: logits [B, output_channels, H, W]."""
        self._check_image(image)
        seed = _seed_or_draw(seed, "MedNCA.forward")
        state = self._level0(image, seed, backend)
        state = F.interpolate(state, scale_factor=self.downscale, mode="nearest")
        state = self._level1(state, image, seed, backend)
        return state if return_state else self._logits(state)

    def forward_patch(
        self,
        image: torch.Tensor,
        target: torch.Tensor,
        patch_size: int = 64,
        seed: int | None = None,
        backend: str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch training mode: returns (logits, target) on one random patch per image.

        Level 0 runs on the whole downscaled image; its state is upsampled only
        where the patch lies (gather from the low-res state = nearest upsample +
        crop), so gradients reach level 0 through the patch. ``generator`` draws the
        patch positions and, when ``seed`` is None, the fire-mask seed (default: torch's
        default CPU generator).
        """
        self._check_image(image)
        B, _, H, W = image.shape
        if not isinstance(target, torch.Tensor) or target.shape != (B, self.output_channels, H, W):
            got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
            raise ValueError(f"target must be [B, output_channels, H, W] = [{B}, {self.output_channels}, {H}, {W}] "
                             f"like the logits, got {got}")
        _checks.same_device(image, "image", target=target)
        p = _checks.integer(patch_size, "patch_size")
        if p > H or p > W or p < 2:
            raise ValueError(f"patch_size must be in [2, min(H, W)], got {p} for {H}x{W}")
        seed = _seed_or_draw(seed, "MedNCA.forward_patch", generator)
        state0 = self._level0(image, seed, backend)
        gen_dev = generator.device if generator is not None else "cpu"
        y0 = torch.randint(0, H - p + 1, (B,), generator=generator, device=gen_dev).to(image.device)
        x0 = torch.randint(0, W - p + 1, (B,), generator=generator, device=gen_dev).to(image.device)
        ar = torch.arange(p, device=image.device)
        rows, cols = y0[:, None] + ar, x0[:, None] + ar  # [B, p] full-res coordinates
        b = torch.arange(B, device=image.device)[:, None, None]
        f = self.downscale
        state = state0[b, :, (rows // f)[:, :, None], (cols // f)[:, None, :]].permute(0, 3, 1, 2)
        img_p = image[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        tgt_p = target[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        state = self._level1(state, img_p, seed, backend)
        return self._logits(state), tgt_p

    @torch.no_grad()
    def ensemble(self, image: torch.Tensor, n: int = 10, seed: int | None = None,
                 backend: str | None = None) -> EnsembleResult:
        """M3D-NCA pseudo-ensemble: ``n`` inferences with different fire masks.

        Returns the mean probability, its (unbiased) standard deviation map and the
        quality score ``sum(std) / sum(mean)`` per image (higher = less reliable).
        All members run as one batch (member i of image b is batch row i*B + b, so
        every member sees its own mask).
        """
        n = _checks.integer(n, "n")
        if n < 2:
            raise ValueError(f"n must be >= 2 for a standard deviation, got {n}")
        self._check_image(image)
        B = image.shape[0]
        logits = self.forward(image.repeat(n, 1, 1, 1), seed=seed, backend=backend)
        prob = torch.sigmoid(logits.float()).reshape(n, B, *logits.shape[1:])
        mean, std = prob.mean(0), prob.std(0)
        score = std.flatten(1).sum(1) / mean.flatten(1).sum(1).clamp_min(torch.finfo(mean.dtype).tiny)
        return EnsembleResult(mean, std, score)

    # -- persistence
    @classmethod
    def from_original(
        cls,
        model0_path: str | Path,
        model1_path: str | Path | None = None,
        config: str | Path | dict | list | None = None,
        *,
        steps: int | Sequence[int] | None = None,
        fire_rate: float | None = None,
        downscale: int | None = None,
        input_channels: int | None = None,
        output_channels: int | None = None,
        map_location: str | torch.device = "cpu",
    ) -> "MedNCA":
        """Load the authors' Med-NCA / M3D-NCA 2D checkpoints: one state dict per level
        (``model0.pth``, ``model1.pth``), or, with ``model1_path`` None, the single state
        dict of their packaged ``MedNCA`` module (keys ``backbone_lowres.*`` for level 0
        and ``backbone_highres.*`` for level 1).

        ``config`` (path to their ``config.json``, or what it holds: a one-element list of a
        dict, or the dict) supplies steps (``inference_steps``), ``cell_fire_rate`` and
        input/output channels; keyword arguments override it. Channels and hidden size
        come from the weights.

        ``downscale`` is 4 unless given: the authors' code always runs level 0 on the image
        downscaled by 4 (its ``get_outputs`` divides by 4). Their ``input_size`` is not
        that factor: ``input_size[0]`` is only the size of the random level-1 training
        patch, so e.g. ``[[32, 32], [64, 64]]`` still means downscale 4 (reading 2 from
        it dropped the hippocampus Dice from 0.89 to 0.48).

        Both state dicts are checked (keys, fc1 bias) before the model is built.
        """
        cfg = {}
        if config is not None:
            cfg = config if isinstance(config, (dict, list)) else json.loads(Path(config).read_text())
            if isinstance(cfg, list):  # their config.json is a one-element list (on disk or loaded)
                cfg = cfg[0]
        if model1_path is None:
            sds, whats = _packaged_levels(torch.load(model0_path, map_location=map_location, weights_only=True),
                                          str(model0_path))
        else:
            sds = [torch.load(p, map_location=map_location, weights_only=True) for p in (model0_path, model1_path)]
            whats = [str(p) for p in (model0_path, model1_path)]
            for what, sd in zip(whats, sds):
                if _is_packaged(sd):
                    raise ValueError(f"{what} is a packaged Med-NCA state dict (both levels): pass it alone, "
                                     "MedNCA.from_original(path, None, config)")
        for what, sd in zip(whats, sds):
            _check_original_state_dict(sd, what)
        C = sds[0]["p0.weight"].shape[0]
        hidden = sds[0]["fc0.weight"].shape[0]
        model = cls(
            channels=C,
            hidden=hidden,
            fire_rate=fire_rate if fire_rate is not None else cfg.get("cell_fire_rate", 0.5),
            steps=steps if steps is not None else cfg.get("inference_steps", 64),
            downscale=downscale if downscale is not None else 4,
            input_channels=input_channels if input_channels is not None else cfg.get("input_channels", 1),
            output_channels=output_channels if output_channels is not None else cfg.get("output_channels", 1),
        )
        for backbone, sd in zip(model.backbones, sds):
            backbone.load_original_state_dict(sd)
        return model

    def save(self, path: str | Path) -> None:
        """Save config + weights: ``torch.save`` dict, or safetensors for ``*.safetensors``."""
        path = Path(path)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(path), metadata={"format": "fastnca.mednca", "config": json.dumps(self.config)})
        else:
            torch.save({"format": "fastnca.mednca", "version": 1, "config": self.config, "state_dict": sd}, path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "MedNCA":
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device=str(map_location)) as f:
                meta = f.metadata() or {}
                if meta.get("format") != "fastnca.mednca" or "config" not in meta:
                    raise ValueError(f"{path} is not a fastnca MedNCA checkpoint (no fastnca.mednca metadata; "
                                     "use from_original for the authors' weights)")
                config = json.loads(meta["config"])
                sd = {k: f.get_tensor(k) for k in f.keys()}
        else:
            blob = torch.load(path, map_location=map_location, weights_only=True)
            if not isinstance(blob, dict) or blob.get("format") != "fastnca.mednca":
                raise ValueError(f"{path} is not a fastnca MedNCA checkpoint (use from_original for the authors')")
            config, sd = blob["config"], blob["state_dict"]
        model = cls(**config)
        model.load_state_dict(sd)
        return model


# --------------------------------------------------------------------------- losses / metrics


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Med-NCA loss: sum over output channels of BCE + (1 - Dice), each over the whole batch.

    logits, target: [B, out, H, W]. Dice is soft (on sigmoid probabilities) with
    ``smooth`` added to numerator and denominator, as in the original.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits and target must have the same shape, got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    logits, target = logits.float(), target.float()
    loss = logits.new_zeros(())
    for c in range(logits.shape[1]):
        x, y = logits[:, c].flatten(), target[:, c].flatten()
        p = torch.sigmoid(x)
        dice = (2.0 * (p * y).sum() + smooth) / (p.sum() + y.sum() + smooth)
        loss = loss + F.binary_cross_entropy_with_logits(x, y) + (1.0 - dice)
    return loss


def soft_dice(prob: torch.Tensor, target: torch.Tensor) -> float:
    """``2 sum(p y) / (sum(p) + sum(y))`` over everything (the original evaluation, no smoothing)."""
    prob, target = prob.double(), target.double()
    return float(2.0 * (prob * target).sum() / (prob.sum() + target.sum()))


# --------------------------------------------------------------------------- preprocessing


def _cubic_matrix(n_src: int, n_dst: int) -> np.ndarray:
    """[n_dst, n_src] weights of OpenCV's INTER_CUBIC along one axis.

    OpenCV: half-pixel mapping ``fx = (dst + 0.5) * scale - 0.5`` in float32,
    Keys kernel with a = -0.75, taps sx-1..sx+2, out-of-range taps clamped to the
    edge (replicate).
    """
    scale = 1.0 / (n_dst / n_src)  # as cv::resize computes it from dsize
    fx = np.float32((np.arange(n_dst) + 0.5) * scale - 0.5)
    sx = np.floor(fx).astype(np.int64)
    x = (fx - sx).astype(np.float32)
    A = np.float32(-0.75)
    w0 = ((A * (x + 1) - 5 * A) * (x + 1) + 8 * A) * (x + 1) - 4 * A
    w1 = ((A + 2) * x - (A + 3)) * x * x + 1
    w2 = ((A + 2) * (1 - x) - (A + 3)) * (1 - x) * (1 - x) + 1
    w3 = 1 - w0 - w1 - w2
    weights = np.stack([w0, w1, w2, w3], 1).astype(np.float64)
    idx = np.clip(sx[:, None] + np.arange(-1, 3), 0, n_src - 1)
    M = np.zeros((n_dst, n_src))
    np.add.at(M, (np.repeat(np.arange(n_dst), 4), idx.ravel()), weights.ravel())
    return M


def resize_cubic(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """``cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC)`` for a 2D float array."""
    img = np.asarray(img, dtype=np.float64)
    return _cubic_matrix(img.shape[0], height) @ img @ _cubic_matrix(img.shape[1], width).T


def resize_nearest(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """``cv2.resize(..., INTER_NEAREST)``: src index = floor(dst * src / dst_size)."""
    img = np.asarray(img)
    rows = np.minimum(np.floor(np.arange(height) * (img.shape[0] / height)).astype(np.int64), img.shape[0] - 1)
    cols = np.minimum(np.floor(np.arange(width) * (img.shape[1] / width)).astype(np.int64), img.shape[1] - 1)
    return img[rows[:, None], cols[None, :]]


def preprocess_slice(
    image: np.ndarray,
    label: np.ndarray | None = None,
    size: int | tuple[int, int] = 64,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> tuple[np.ndarray, np.ndarray | None]:
    """The original Med-NCA evaluation preprocessing of one 2D slice (rows = first axis).

    1. cubic resize (OpenCV INTER_CUBIC) to ``size``; label nearest;
    2. min-max normalise to [0, 1];
    3. z-normalise + rescale to [0, 1] between the given percentiles, clipped (which
       is min-max of the percentile-clipped slice: z-normalising is affine);
    4. label: nonzero -> 1.
    Returns float32 image [h, w] and float32 label [h, w] (or None).
    """
    h, w = (size, size) if isinstance(size, int) else size
    img = resize_cubic(image, h, w)
    rng = img.max() - img.min()
    img = (img - img.min()) / rng if rng > 0 else np.zeros_like(img)
    lo, hi = np.percentile(img, percentiles)
    img = (np.clip(img, lo, hi) - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    lab = None
    if label is not None:
        lab = (resize_nearest(label, h, w) != 0).astype(np.float32)
    return img.astype(np.float32), lab


def preprocess_volume(
    image: np.ndarray,
    label: np.ndarray | None = None,
    size: int | tuple[int, int] = 64,
    axis: int = 2,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Slice a 3D volume along ``axis`` and :func:`preprocess_slice` each slice.

    Returns image [Z, 1, h, w] and label [Z, 1, h, w] (or None) float32 tensors.
    """
    image = np.moveaxis(np.asarray(image), axis, 0)
    label = None if label is None else np.moveaxis(np.asarray(label), axis, 0)
    imgs, labs = [], []
    for z in range(image.shape[0]):
        i, l = preprocess_slice(image[z], None if label is None else label[z], size)
        imgs.append(i)
        labs.append(l)
    img_t = torch.from_numpy(np.stack(imgs))[:, None]
    lab_t = None if label is None else torch.from_numpy(np.stack(labs))[:, None]
    return img_t, lab_t


def synthetic_ellipses(
    n: int,
    size: int = 64,
    noise: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy segmentation set: one bright random ellipse per image on a textured background.

    Returns image [n, 1, size, size] in [0, 1] and its binary mask [n, 1, size, size].
    The ellipse is brighter than the background on average but overlaps it in
    intensity (noise, a smooth gradient and a dimmer distractor blob), so the task
    needs context, not a threshold.
    """
    g = generator
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    cy, cx = (u(n, 2) * 1.0 - 0.5).unbind(1)
    ry, rx = (0.2 + 0.35 * u(n, 2)).unbind(1)
    th = u(n) * math.pi
    dy, dx = yy - cy[:, None, None], xx - cx[:, None, None]
    c, s = torch.cos(th)[:, None, None], torch.sin(th)[:, None, None]
    a, b = c * dy + s * dx, -s * dy + c * dx
    mask = ((a / ry[:, None, None]) ** 2 + (b / rx[:, None, None]) ** 2 <= 1.0).float()
    # distractor: a dimmer round blob somewhere else
    by, bx = (u(n, 2) * 1.6 - 0.8).unbind(1)
    blob = (((yy - by[:, None, None]) ** 2 + (xx - bx[:, None, None]) ** 2) <= 0.15**2).float()
    grad = (u(n)[:, None, None] - 0.5) * 0.3 * (yy + xx)
    img = 0.25 + grad + 0.45 * mask + 0.25 * blob * (1 - mask) + noise * torch.randn(n, size, size, generator=g)
    return img.clamp(0, 1)[:, None], mask[:, None]
