"""Model-level benchmarks: a GeCA diffusion training step and sampling throughput, and a
Med-NCA training step, each against the original code's structure in plain PyTorch."""
from __future__ import annotations

import types

import torch

from .._checks import dtype_name
from .common import Result, largest_size_within, median_ms, peak_mb, release, selected, sync, timed_backends
from .neighborhood_attention import unfold_attention


def _unfold_forward(self, x, backend=None):
    """GeCA's LocalAttention the way the original computes it (unfolded K and V)."""
    B, H, W, _ = x.shape
    q, k, v = self.to_qkv(x).view(B, H, W, 3, self.heads, self.dim_head).unbind(3)
    return self.to_out(unfold_attention(q, k, v).reshape(B, H, W, self.heads * self.dim_head))


def _impls(device, op: str) -> list[tuple[str, str | None]]:
    """(impl, backend): the original structure (backend None) first, then each fastnca backend
    with kernels for ``op``, narrowed by ``fastnca bench --impls`` (common.selected)."""
    return selected([("pytorch", None)] + [(f"fastnca:{b}", b) for b in timed_backends(device, op, reference=False)])


def _geca_model(cfg, backend, device):
    """GeCA with random weights (leave the zero-init: every layer does work). backend None is
    the original structure: unfold attention, plain autograd through the 12 steps."""
    from fastnca.models.geca import GeCA

    torch.manual_seed(0)
    model = GeCA(cfg, checkpoint_steps=backend is not None, backend=backend).to(device)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if backend is None:
        attn = model.transformer.layers[0][0].fn
        attn.forward = types.MethodType(_unfold_forward, attn)
    return model


def geca(device: torch.device, dtype: torch.dtype, quick: bool, roofs: dict, log=print) -> list[Result]:
    """GeCA diffusion training step (time, peak memory), then sampling throughput."""
    from fastnca.models.geca import CONFIGS, GeCAConfig
    from fastnca.models.geca_diffusion import create_diffusion

    results = []
    dname = dtype_name(dtype)
    if device.type == "cuda":
        configs = [("GeCA-S", 32, 32), ("GeCA-XS", 32, 32)]
    else:
        configs = [("GeCA-XS", 4 if not quick else 2, 32)]
    diffusion = create_diffusion()
    for name, B, size in configs:
        cfg = GeCAConfig(num_classes=5, **CONFIGS[name])
        label = f"{name} B={B} {size}x{size} 12 CA steps"
        x0 = torch.randn(B, 4, size, size, device=device)
        y = (torch.rand(B, 5, device=device) < 0.5).float()
        t = torch.randint(0, 1000, (B,), device=device)
        for impl, backend in _impls(device, "neighborhood_attention"):
            model = _geca_model(cfg, backend, device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

            def train_step():
                with amp:
                    loss = diffusion.training_losses(model, x0, t, y)["loss"].mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            log(f"  geca {name} {impl} ...")
            try:
                ms = median_ms(train_step, device, reps=3 if quick else 5, warmup=1)
                results.append(Result("geca_train", label, impl, dname, None, ms, None, peak_mb(train_step, device)))
            except Exception as e:
                results.append(Result("geca_train", label, impl, dname, note=f"error: {type(e).__name__}: {e}"[:120]))
            release(device)
    return results + geca_sampling(device, dtype, quick, log)


def geca_sampling(device: torch.device, dtype: torch.dtype, quick: bool, log=print) -> list[Result]:
    """Images/s of respaced ancestral sampling as examples/sample_geca.py runs it: CFG 1.5
    (doubled batch, separate cond/uncond cells) and Gene Heredity Guidance, 12 CA steps per
    diffusion step. Throughput scales as 1 / steps, so a few steps stand for the default 250."""
    from fastnca.models.geca import CONFIGS, GeCAConfig
    from fastnca.models.geca_diffusion import create_diffusion

    results = []
    dname = dtype_name(dtype)
    if device.type == "cuda":
        configs = [("GeCA-S", 32, 32, 25), ("GeCA-XS", 32, 32, 25)]
    else:
        configs = [("GeCA-XS", 1, 16, 2)] if quick else [("GeCA-XS", 2, 32, 4)]
    for name, B, size, steps in configs:
        cfg = GeCAConfig(num_classes=5, **CONFIGS[name])
        diffusion = create_diffusion(str(steps))
        label = f"{name} B={B} {size}x{size} {steps} steps x 12 CA steps, CFG 1.5, GHG"
        y = (torch.rand(B, 5, device=device) < 0.5).float()
        for impl, backend in _impls(device, "neighborhood_attention"):
            model = _geca_model(cfg, backend, device).eval()
            amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

            def sample():
                g = torch.Generator(device).manual_seed(0)
                with amp:
                    return diffusion.sample(model, y, (B, 4, size, size), cfg_scale=1.5, ghg=True, generator=g)

            log(f"  geca sampling {name} {impl} ...")
            try:
                ms = median_ms(sample, device, reps=2 if quick else 3, warmup=1)
                ips = B / (ms * 1e-3)
                results.append(Result("geca_sample", label, impl, dname, fwd_ms=ms, peak_mb=peak_mb(sample, device),
                                      note=f"{ips:.3g} images/s", extra={"images_per_s": ips}))
            except Exception as e:
                results.append(Result("geca_sample", label, impl, dname, note=f"error: {type(e).__name__}: {e}"[:120]))
            release(device)
    return results


def _paper_mednca(model, image, target, patch, generator, dtype=torch.float32):
    """Two-level Med-NCA in the original structure: channels-last states, PaperStep
    (conv perception + Linear layers) under plain autograd for every step. The state is
    kept in ``dtype`` (the autocast dtype), as fastnca's MedNCA keeps it: a float32 state
    under bfloat16 autocast would hold, and time, twice the bytes."""
    import torch.nn.functional as F

    from fastnca.models.mednca import downscale

    from .nca_step import PaperStep

    f, (s0, s1) = model.downscale, model.steps
    steps = []
    for bb in model.backbones:
        rule = (bb.perception_weight, bb.perception_bias, bb.fc1_weight, bb.fc1_bias,
                bb.fc2_weight[bb.input_channels:], None)
        steps.append(PaperStep(rule, 1, bb.padding, bb.update_prob, bb.input_channels))
    B, _, H, W = image.shape
    low = downscale(image, f)
    x = torch.zeros(B, low.shape[2], low.shape[3], model.channels, device=image.device, dtype=dtype)
    x = torch.cat([low.permute(0, 2, 3, 1).to(dtype), x[..., 1:]], -1)
    for _ in range(s0):
        x = steps[0](x)
    x = F.interpolate(x.permute(0, 3, 1, 2), scale_factor=f, mode="nearest").permute(0, 2, 3, 1)
    img, tgt = image, target
    if patch:
        y0 = int(torch.randint(0, H - patch + 1, (), generator=generator))
        x0 = int(torch.randint(0, W - patch + 1, (), generator=generator))
        x = x[:, y0:y0 + patch, x0:x0 + patch]
        img, tgt = image[..., y0:y0 + patch, x0:x0 + patch], target[..., y0:y0 + patch, x0:x0 + patch]
    x = torch.cat([img.permute(0, 2, 3, 1).to(dtype), x[..., 1:]], -1)
    for _ in range(s1):
        x = steps[1](x)
    return x[..., 1:2].permute(0, 3, 1, 2), tgt


def _mednca_train_step(device, dtype, backend, B, size, patch):
    """One Med-NCA (C=32, h=128, 64+64 steps) training step with the paper's optimiser, on
    random data: the original structure in plain PyTorch when ``backend`` is None."""
    from fastnca.models.mednca import MedNCA, dice_bce_loss

    torch.manual_seed(0)
    image = torch.rand(B, 1, size, size, device=device)
    target = (torch.rand(B, 1, size, size, device=device) > 0.7).float()
    model = MedNCA(channels=32, hidden=128, steps=64).to(device)
    for bb in model.backbones:  # a trained-like rule: fc2 is not zero
        torch.nn.init.normal_(bb.fc2_weight, std=0.02)
    opt = torch.optim.Adam(model.parameters(), lr=1.6e-3, betas=(0.5, 0.5))
    gen = torch.Generator().manual_seed(0)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def train_step():
        with amp:
            if backend is None:
                logits, tgt = _paper_mednca(model, image, target, patch, gen, dtype)
            elif patch:
                logits, tgt = model.forward_patch(image, target, patch, backend=backend, generator=gen)
            else:
                logits, tgt = model(image, backend=backend), target
            loss = dice_bce_loss(logits.float(), tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return train_step


def _peak_bytes(device, dtype, backend, B, size):
    """Peak CUDA memory of one full-resolution training step, everything it makes (data,
    model, optimiser state) included: what has to fit on the card. Memory allocated before
    it (earlier suites' tensors, cuBLAS workspaces kept per stream) is not counted."""
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _mednca_train_step(device, dtype, backend, B, size, None)()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


MAX_SIZE_BUDGET_GB = 8


def mednca(device: torch.device, dtype: torch.dtype, quick: bool, roofs: dict, log=print) -> list[Result]:
    results = []
    dname = dtype_name(dtype)
    B, size = (8, 256) if device.type == "cuda" else (1, 64)
    label = f"Med-NCA C=32 h=128 B={B} {size}x{size} 64+64 steps"
    impls = _impls(device, "nca_step")
    for mode, patch in (("patch 64", 64), ("full-res", None)):
        for impl, backend in impls:
            log(f"  mednca {mode} {impl} ...")
            try:
                train_step = _mednca_train_step(device, dtype, backend, B, size, patch)
                ms = median_ms(train_step, device, reps=3, warmup=1)
                results.append(Result("mednca_train", f"{label} {mode}", impl, dname, None, ms, None,
                                      peak_mb(train_step, device)))
            except Exception as e:
                results.append(Result("mednca_train", f"{label} {mode}", impl, dname,
                                      note=f"error: {type(e).__name__}: {e}"[:120]))
            release(device)
    if device.type != "cuda":
        return results
    # The largest square image one full-resolution training step (B=1) fits in on an 8 GB card.
    # Limit 4096: one fp32 state is 2 GB there, so nothing near it fits, and the probes stay
    # clear of 2^31-element tensors.
    budget = MAX_SIZE_BUDGET_GB * 2**30
    config = f"Med-NCA C=32 h=128 B=1 full-res 64+64 steps: largest size within {MAX_SIZE_BUDGET_GB} GB"
    for impl, backend in impls:
        log(f"  mednca largest size {impl} ...")
        try:
            best, probes = largest_size_within(lambda s: _peak_bytes(device, dtype, backend, 1, s), budget,
                                               start=256, multiple=32, limit=4096)
            peak = probes[best] / 2**20 if best else None
            extra = {"max_size": best, "budget_gb": MAX_SIZE_BUDGET_GB,
                     "probes_mb": {s: (b / 2**20 if b is not None else None) for s, b in sorted(probes.items())}}
            note = f"{best}x{best}" if best else "none fits"
            results.append(Result("mednca_max_size", config, impl, dname, peak_mb=peak, note=note, extra=extra))
        except Exception as e:
            results.append(Result("mednca_max_size", config, impl, dname, note=f"error: {type(e).__name__}: {e}"[:120]))
        release(device)
    return results


SUITES = {"geca": geca, "mednca": mednca}
