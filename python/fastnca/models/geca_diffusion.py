"""Diffusion for GeCA: DDPM with learned-range variance (Nichol & Dhariwal 2021),
respaced sampling, classifier-free guidance on the epsilon channels and Gene Heredity
Guidance (GHG, Elbatel et al. 2024).

- Forward process: linear betas 1e-4 .. 2e-2, T = 1000, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
- Model output (the GeCA out channels, 2 * in_ch): [eps | v]; the log variance is
  ``frac * log(beta_t) + (1 - frac) * log(beta_tilde_t)`` with ``frac = (v + 1) / 2``
  (beta_tilde = posterior variance, its t = 0 entry clipped to the t = 1 value).
- Loss (hybrid): ``mean((eps - eps_hat)^2) + L_vb`` where L_vb uses the model's variance
  but a stop-gradient on its mean (eps_hat detached): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
  in bits per dim for t > 0, and the discretized Gaussian decoder NLL (bins of 2/255 for
  data in [-1, 1]) at t = 0. L_vb is scaled by T / 1000 (the "rescaled" hybrid; 1 at T = 1000).
- Respacing: ``space_timesteps`` picks a subset S of the T steps ("250", "10,20,30" per
  section, or "ddimN"); the respaced chain has betas ``1 - abar_s / abar_prev(s)`` over S and
  the model sees the original timestep index of each kept step.
- Sampling with CFG: the batch is doubled (labels y and the all-zero null label), both halves
  see the same x_t, and the guided epsilon ``eps_u + s (eps_c - eps_u)`` replaces the
  epsilon channels; the variance channels stay the conditional ones. The cond and uncond
  halves each keep their own cell state from one diffusion step to the next.
- GHG: each diffusion step starts the CA from the previous step's final cells with the
  new x_t, carrying the hidden channels and re-seeding the out channels (zeros, normal at
  the centre cell). Without CFG the authors' sampler carries out and hidden channels; the
  ``carry`` argument selects any of the paper's ablations ("hidden", "out", "out+hidden",
  "none").
"""

from __future__ import annotations

import math

import torch

from .geca import draw_seed

__all__ = [
    "GeCADiffusion",
    "create_diffusion",
    "space_timesteps",
    "linear_betas",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "cfg_combine",
    "heredity_cells",
]


# --------------------------------------------------------------------------- schedule


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """Which of ``num_timesteps`` steps to keep.

    ``section_counts``: an int or a string of comma-separated counts; the range is split
    into that many equal sections (the first ones one step longer when it does not divide)
    and each section keeps its count of steps, evenly strided with rounding, first and last
    step of the section included. "ddimN" keeps every (T // N)-th step starting at 0."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {want} steps with an integer stride")
        section_counts = [int(s) for s in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return set(kept)


# --------------------------------------------------------------------------- densities


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    # tanh approximation of Phi (Page 1977), accurate to ~1e-4 and cheap
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) of data in [-1, 1] quantised to 256 levels under N(means, e^(2 log_scales)):
    the Gaussian mass of the bin [x - 1/255, x + 1/255]; the edge bins extend to +-inf."""
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x):
    return x.mean(dim=tuple(range(1, x.ndim)))


# --------------------------------------------------------------------------- guidance


def cfg_combine(out: torch.Tensor, scale: float, in_channels: int) -> torch.Tensor:
    """Classifier-free guidance on a doubled batch [cond; uncond] of model outputs
    [2B, 2*in_ch, H, W]: returns [B, 2*in_ch, H, W] with guided epsilon channels and the
    conditional half's variance channels."""
    cond, uncond = out.chunk(2, dim=0)
    eps = uncond[:, :in_channels] + scale * (cond[:, :in_channels] - uncond[:, :in_channels])
    return torch.cat([eps, cond[:, in_channels:]], dim=1)


_CARRY = {"none": (False, False), "out": (True, False), "hidden": (False, True), "out+hidden": (True, True)}


def heredity_cells(model, prev_cells: torch.Tensor, carry: str = "hidden",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Starting cells of the next diffusion step from the previous step's final cells:
    a fresh seed (zeros, normal out channels at the centre cell) with the channels named
    by ``carry`` copied from ``prev_cells``. The x_t channels are left for the model to
    overwrite with the new x_t."""
    if carry not in _CARRY:
        raise ValueError(f"carry must be one of {sorted(_CARRY)}, got {carry!r}")
    carry_out, carry_hidden = _CARRY[carry]
    ci, co = model.in_channels, model.in_channels + model.out_channels
    cells = model.seed_cells(prev_cells[:, :ci], generator=generator)
    if carry_out:
        cells[:, ci:co] = prev_cells[:, ci:co]
    if carry_hidden:
        cells[:, co:] = prev_cells[:, co:]
    return cells


# --------------------------------------------------------------------------- diffusion


class GeCADiffusion:
    """Gaussian diffusion over ``len(betas)`` steps; ``timestep_map[i]`` is the original
    timestep index the model is given for step i (identity unless respaced)."""

    def __init__(self, betas: torch.Tensor, timestep_map: list[int] | None = None, *,
                 original_num_steps: int | None = None):
        b = betas.to(torch.float64)
        if b.ndim != 1 or not (0 < b.min() and b.max() <= 1):
            raise ValueError("betas must be a 1-D tensor in (0, 1]")
        self.num_timesteps = T = len(b)
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(T), dtype=torch.long)
        self.original_num_steps = original_num_steps or T
        self.betas = b
        alphas = 1.0 - b
        self.alphas_cumprod = acp = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        self.sqrt_alphas_cumprod = acp.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - acp).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / acp).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / acp - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = pv = b * (1.0 - acp_prev) / (1.0 - acp)
        # pv[0] = 0: clip the log to the t = 1 value. One step (respacing "1") has no t = 1,
        # and its t = 0 step adds no noise: any finite value (beta_0) serves.
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]) if T > 1 else b)
        self.posterior_mean_coef1 = b * acp_prev.sqrt() / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp)
        self.log_betas = torch.log(b)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _at(arr: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """arr[t] as float32 on x's device, shaped to broadcast over x."""
        v = arr[t.detach().cpu().long()].to(device=x.device, dtype=torch.float32)
        return v.view(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return self.timestep_map.to(t.device)[t]

    def sample_timesteps(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator,
                          device=generator.device if generator is not None else device)
        return t.to(device)

    # ------------------------------------------------------------------ q

    def q_sample(self, x0, t, noise=None):
        noise = torch.randn_like(x0) if noise is None else noise
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior_mean_variance(self, x0, xt, t):
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_variance, t, xt), self._at(self.posterior_log_variance_clipped, t, xt)

    # ------------------------------------------------------------------ p

    def p_mean_variance(self, model_output, xt, t, clip_denoised: bool = False):
        """Mean / variance of p(x_{t-1} | x_t) from the model output [eps | v]."""
        C = xt.shape[1]
        if model_output.shape[1] != 2 * C:
            raise ValueError(f"model output has {model_output.shape[1]} channels, expected {2 * C} (eps | v)")
        model_output = model_output.float()
        eps, v = model_output[:, :C], model_output[:, C:]
        min_log = self._at(self.posterior_log_variance_clipped, t, xt)
        max_log = self._at(self.log_betas, t, xt)
        frac = (v + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
        pred_x0 = self._at(self.sqrt_recip_alphas_cumprod, t, xt) * xt - self._at(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, xt, t)
        return {"mean": mean, "variance": torch.exp(log_var), "log_variance": log_var, "pred_xstart": pred_x0,
                "eps": eps}

    def vb_terms_bpd(self, model_output, x0, xt, t, clip_denoised: bool = False):
        """Per-sample variational-bound term in bits per dim (KL for t > 0, decoder NLL at t = 0)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        out = self.p_mean_variance(model_output, xt, t, clip_denoised=clip_denoised)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x0, t, y, noise=None, **model_kwargs) -> dict:
        """Hybrid loss per sample: {"loss", "mse", "vb"}. ``t`` indexes this diffusion's
        steps; the model receives ``timestep_map[t]``."""
        x0 = x0.float()
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        out = model(xt, self.model_timesteps(t), y, **model_kwargs).float()
        C = x0.shape[1]
        eps = out[:, :C]
        # stop-gradient on the mean: the VB term trains the variance only
        frozen = torch.cat([eps.detach(), out[:, C:]], dim=1)
        vb = self.vb_terms_bpd(frozen, x0, xt, t) * (self.num_timesteps / 1000.0)
        mse = _mean_flat((noise - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, model, y: torch.Tensor, shape=None, *, noise: torch.Tensor | None = None,
               cfg_scale: float = 1.5, ghg: bool = True, carry: str | None = None,
               clip_denoised: bool = False, ca_steps: int | None = None,
               generator: torch.Generator | None = None, progress: bool = False,
               return_cells: bool = False):
        """Ancestral sampling from x_T ~ N(0, I) to x_0 for labels y [B, ncls].

        shape: (B, in_ch, H, W) of x (or pass ``noise`` = x_T). ``cfg_scale`` != 1 enables
        classifier-free guidance (null label = zeros). Cell carry-over between diffusion
        steps (Gene Heredity Guidance): ``carry`` in {"hidden", "out", "out+hidden", "none"};
        default: ghg=True -> "hidden" with CFG, "out+hidden" without (the authors'
        sampler); ghg=False -> "none" (every step starts from the seed).
        ``generator`` (on the sampling device or CPU) makes the whole chain repeatable."""
        device = y.device
        gdev = generator.device if generator is not None else device

        def randn(*s):
            return torch.randn(*s, generator=generator, device=gdev).to(device)

        if noise is None:
            if shape is None:
                raise ValueError("pass shape or noise")
            noise = randn(*shape)
        x = noise.to(device=device, dtype=torch.float32)
        B = x.shape[0]
        use_cfg = cfg_scale is not None and cfg_scale != 1.0
        if carry is None:
            carry = ("hidden" if use_cfg else "out+hidden") if ghg else "none"
        if carry not in _CARRY:
            raise ValueError(f"carry must be one of {sorted(_CARRY)}, got {carry!r}")
        y = y.to(device)
        y_in = torch.cat([y, torch.zeros_like(y)]) if use_cfg else y
        cells = None
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # optional (the [examples] extra): no bar without it
                pass
            else:
                steps = tqdm(steps, desc="sampling")
        was_training = model.training
        model.eval()
        # The chain stays in float32; a half-precision model gets its inputs in its dtype.
        mdtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        try:
            for i in steps:
                t = torch.full((B,), i, device=device, dtype=torch.long)
                x_in = (torch.cat([x, x]) if use_cfg else x).to(mdtype)
                t_in = self.model_timesteps(torch.cat([t, t]) if use_cfg else t)
                start = None if cells is None else heredity_cells(model, cells, carry, generator)
                if start is None:
                    start = model.seed_cells(x_in, generator=generator)
                seed = draw_seed(generator) if generator is not None else None
                out, cells = model(x_in, t_in, y_in, cells=start, steps=ca_steps, seed=seed, return_cells=True)
                out = out.float()
                if use_cfg:
                    out = cfg_combine(out, cfg_scale, x.shape[1])
                pm = self.p_mean_variance(out, x, t, clip_denoised=clip_denoised)
                z = randn(*x.shape) if i > 0 else torch.zeros_like(x)
                x = pm["mean"] + torch.exp(0.5 * pm["log_variance"]) * z
        finally:
            model.train(was_training)
        return (x, cells) if return_cells else x


def create_diffusion(timestep_respacing="", *, num_timesteps: int = 1000, beta_start: float = 1e-4,
                     beta_end: float = 2e-2) -> GeCADiffusion:
    """The GeCA diffusion. ``timestep_respacing`` "" (or None) keeps all T steps
    (training); "250" gives the default sampler."""
    betas = linear_betas(num_timesteps, beta_start, beta_end)
    if timestep_respacing in ("", None):
        return GeCADiffusion(betas)
    use = space_timesteps(num_timesteps, timestep_respacing)
    acp = torch.cumprod(1.0 - betas, 0)
    new_betas, tmap, last = [], [], 1.0
    for i in range(num_timesteps):
        if i in use:
            new_betas.append(1.0 - acp[i].item() / last)
            last = acp[i].item()
            tmap.append(i)
    return GeCADiffusion(torch.tensor(new_betas, dtype=torch.float64), tmap, original_num_steps=num_timesteps)
