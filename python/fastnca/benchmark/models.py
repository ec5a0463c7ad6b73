"""Model-level benchmarks: a GeCA diffusion training step and sampling throughput, and a
Med-NCA training step, each against the original code's structure in plain PyTorch."""
from __future__ import annotations

import types

import torch

from fastnca import _backend

from .common import Result, median_ms, peak_mb
from .neighborhood_attention import unfold_attention


def _backends(device, op):
    names = [b for b in ("cpu", "cuda", "triton")
             if _backend._usable_on(b, device) is True and _backend.has_kernel(b, op)]
    return names or ["reference"]


def _unfold_forward(self, x, backend=None):
    """GeCA's LocalAttention the way the original computes it (unfolded K and V)."""
    B, H, W, _ = x.shape
    q, k, v = self.to_qkv(x).view(B, H, W, 3, self.heads, self.dim_head).unbind(3)
    return self.to_out(unfold_attention(q, k, v).reshape(B, H, W, self.heads * self.dim_head))


def geca(device: torch.device, dtype: torch.dtype, quick: bool, roofs: dict, log=print) -> list[Result]:
    from fastnca.models.geca import GeCA, GeCAConfig
    from fastnca.models.geca_diffusion import create_diffusion

    results = []
    dname = str(dtype).replace("torch.", "")
    if device.type == "cuda":
        configs = [("GeCA-S", dict(embed_dim=768, heads=12, mlp_dim=3072, hidden_channels=64), 32, 32),
                   ("GeCA-XS", dict(), 32, 32)]
    else:
        configs = [("GeCA-XS", dict(), 4 if not quick else 2, 32)]
    diffusion = create_diffusion()
    for name, kw, B, size in configs:
        cfg = GeCAConfig(num_classes=5, **kw)
        label = f"{name} B={B} {size}x{size} 12 CA steps"
        x0 = torch.randn(B, 4, size, size, device=device)
        y = (torch.rand(B, 5, device=device) < 0.5).float()
        t = torch.randint(0, 1000, (B,), device=device)
        impls = [("pytorch", None, False)] + [(f"fastnca:{b}", b, True) for b in _backends(device, "neighborhood_attention")]
        for impl, backend, ckpt in impls:
            torch.manual_seed(0)
            model = GeCA(cfg, checkpoint_steps=ckpt, backend=backend).to(device).train()
            for p in model.parameters():  # leave the zero-init: every layer does work
                torch.nn.init.normal_(p, std=0.02)
            if backend is None:
                attn = model.transformer.layers[0][0].fn
                attn.forward = types.MethodType(_unfold_forward, attn)
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
            del model, opt
    return results


def mednca(device: torch.device, dtype: torch.dtype, quick: bool, roofs: dict, log=print) -> list[Result]:
    try:
        from fastnca.models import mednca as m
    except ImportError as e:
        return [Result("mednca_train", "-", "-", str(dtype), note=f"unavailable: {e}")]
    if not hasattr(m, "benchmark_cases"):
        return []
    return m.benchmark_cases(device, dtype, quick, log)


SUITES = {"geca": geca, "mednca": mednca}
