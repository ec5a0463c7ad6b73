"""GeCA model and diffusion (fastnca.models.geca, fastnca.models.geca_diffusion).

The equivalence test checks the model against an independent, deliberately plain
re-implementation of the authors' forward structure written below (token sequence,
``F.unfold`` 3x3 attention with zero padding, conditioning recomputed every step,
plain autograd) that shares only the state-dict names."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnca
from conftest import assert_close, device_for, fast_backends
from fastnca.models.geca import GeCA, GeCAConfig, geca_s, geca_xs
from fastnca.models.geca_diffusion import (
    cfg_combine,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    heredity_cells,
    normal_kl,
    space_timesteps,
)

TINY = dict(embed_dim=32, heads=2, dim_head=16, mlp_dim=48, hidden_channels=8, num_classes=5)


def tiny(**kw) -> GeCA:
    return GeCA(GeCAConfig(**{**TINY, **kw}))


def perturb_(model: nn.Module, std: float = 0.15, seed: int = 0) -> nn.Module:
    """Overwrite every parameter with random values (so zero-initialised layers can't hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return model


def inputs(B=2, H=6, W=7, ncls=5, seed=1, in_ch=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, in_ch, H, W, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = (torch.rand(B, ncls, generator=g) < 0.5).float()
    return x, t, y


# --------------------------------------------------------------------------- original structure


class _OrigTimestep(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))

    def forward(self, t):
        freqs = torch.tensor([math.exp(-math.log(10000) * i / 128) for i in range(128)])
        a = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(a), torch.sin(a)], 1))


class _OrigLabels(nn.Module):
    def __init__(self, n, D):
        super().__init__()
        self.embedding_table = nn.Sequential(nn.Linear(n, D), nn.Linear(D, D))

    def forward(self, y):
        return self.embedding_table(y)


class _OrigAttn(nn.Module):
    def __init__(self, D, heads, dh):
        super().__init__()
        self.heads, self.dh = heads, dh
        self.to_qkv = nn.Linear(D, 3 * heads * dh, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dh, D), nn.Dropout(0.0))

    def forward(self, x, H, W):
        B, N, _ = x.shape
        h, d = self.heads, self.dh
        q, k, v = (z.reshape(B, N, h, d).transpose(1, 2) for z in self.to_qkv(x).chunk(3, dim=-1))  # b h n d

        def unfold(z):  # [b, h, n, d] -> [b, h, d, 9, n], zero outside the grid
            img = z.transpose(2, 3).reshape(B * h, d, H, W)
            return F.unfold(img, kernel_size=3, padding=1).view(B, h, d, 9, N)

        logits = torch.einsum("bhnd,bhdjn->bhnj", q, unfold(k)) * d ** -0.5
        attn = logits.softmax(dim=-1)
        out = torch.einsum("bhnj,bhdjn->bhnd", attn, unfold(v))
        return self.to_out(out.transpose(1, 2).reshape(B, N, h * d))


class _OrigFF(nn.Module):
    def __init__(self, D, m):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, m), nn.GELU(), nn.Dropout(0.0), nn.Linear(m, D), nn.Dropout(0.0))


class _OrigPreNorm(nn.Module):
    def __init__(self, D, fn):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fn = fn


class _OrigTransformer(nn.Module):
    def __init__(self, D, heads, dh, m):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([_OrigPreNorm(D, _OrigAttn(D, heads, dh)),
                                                    _OrigPreNorm(D, _OrigFF(D, m))])])
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))


class _OrigFinal(nn.Module):
    def __init__(self, D, out):
        super().__init__()
        self.linear = nn.Linear(D, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))


class OriginalGeCA(nn.Module):
    """Plain re-statement of the authors' forward (tokens [B, N, C], raster order)."""

    def __init__(self, D, heads, dh, mlp, hidden, ncls, in_ch=4):
        super().__init__()
        self.D, self.in_ch = D, in_ch
        self.t_embedder = _OrigTimestep(D)
        self.y_embedder = _OrigLabels(ncls, D)
        self.cell_to_embedding = nn.Linear(3 * in_ch + hidden, D)
        self.transformer = _OrigTransformer(D, heads, dh, mlp)
        self.final_layer = _OrigFinal(D, 2 * in_ch + hidden)

    def pos(self, N):
        pe = torch.zeros(N, self.D, dtype=torch.float64)
        for n in range(N):
            for c in range(self.D):
                a = n * math.exp(-math.log(10000.0) * c / self.D)
                pe[n, c] = math.sin(a) if c % 2 == 0 else math.cos(a)
        return pe.float()

    def forward(self, cells, t, y, steps, masks):
        B, C, H, W = cells.shape
        N = H * W
        pe = self.pos(N)
        for i in range(steps):
            c = self.t_embedder(t) + self.y_embedder(y)
            x = self.cell_to_embedding(cells.permute(0, 2, 3, 1).reshape(B, N, C)) + pe
            sm, cm, gm, sf, cf, gf = self.transformer.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=2)
            attn, ff = self.transformer.layers[0]
            x = x + gm * attn.fn(attn.norm(x) * (1 + cm) + sm, H, W)
            x = x + gf * ff.fn.net(ff.norm(x) * (1 + cf) + sf)
            shift, scale = self.final_layer.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=2)
            x = F.layer_norm(x, (self.D,), eps=1e-6) * (1 + scale) + shift
            upd = self.final_layer.linear(x).reshape(B, H, W, -1).permute(0, 3, 1, 2)
            if masks is not None:
                upd = upd * masks[i][:, None].float()
            cells = torch.cat([cells[:, : self.in_ch], cells[:, self.in_ch:] + upd], dim=1)
        return cells


def _original_for(model: GeCA) -> OriginalGeCA:
    c = model.config
    ref = OriginalGeCA(c.embed_dim, c.heads, c.dim_head, c.mlp_dim, c.hidden_channels, c.num_classes, c.in_channels)
    ref.load_state_dict(model.state_dict(), strict=True)  # same names, same shapes
    return ref


# --------------------------------------------------------------------------- shapes / params


@pytest.mark.parametrize("make,ncls,count", [
    (geca_s, 11, 13_312_584), (geca_s, 5, 13_307_976), (geca_xs, 5, 2_253_416), (geca_xs, 11, 2_255_720)])
def test_param_counts(make, ncls, count):
    assert sum(p.numel() for p in make(ncls).parameters()) == count


def test_shapes_and_state_dict_names():
    m = tiny()
    x, t, y = inputs()
    out, cells = m(x, t, y, return_cells=True)
    assert out.shape == (2, 8, 6, 7) and cells.shape == (2, 4 + 8 + 8, 6, 7)
    keys = set(m.state_dict())
    for k in ["t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.1.weight",
              "cell_to_embedding.weight", "transformer.layers.0.0.norm.weight", "transformer.layers.0.0.fn.to_qkv.weight",
              "transformer.layers.0.0.fn.to_out.0.bias", "transformer.layers.0.1.fn.net.0.weight",
              "transformer.layers.0.1.fn.net.3.bias", "transformer.adaLN_modulation.1.weight",
              "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"]:
        assert k in keys
    assert "transformer.layers.0.0.fn.to_qkv.bias" not in keys
    assert m.state_dict()["transformer.layers.0.0.fn.to_qkv.weight"].shape == (96, 32)


def test_load_original_checkpoint_dict():
    src = perturb_(tiny())
    ema = {k: v + 1 for k, v in src.state_dict().items()}
    ckpt = {"model": {"module." + k: v for k, v in src.state_dict().items()}, "ema": ema, "opt": {}, "args": None}
    m = tiny()
    m.load_original_state_dict(ckpt)
    assert all(torch.equal(m.state_dict()[k], ema[k]) for k in ema)
    m.load_original_state_dict(ckpt, key="model")
    assert all(torch.equal(m.state_dict()[k], v) for k, v in src.state_dict().items())
    del ckpt["ema"]  # raw weights only: asking for the EMA ones is an error, not a silent swap
    with pytest.raises(KeyError, match="no 'ema' weights, only \\['model'\\]"):
        m.load_original_state_dict(ckpt)


def test_seed_cells():
    m = tiny()
    x = torch.randn(3, 4, 5, 6)
    c = m.seed_cells(x)
    assert torch.equal(c[:, :4], x)
    centre = torch.zeros(5, 6, dtype=torch.bool)
    centre[2, 3] = True
    assert (c[:, 4:12, centre] != 0).all()
    assert (c[:, 4:12][..., ~centre] == 0).all() and (c[:, 12:] == 0).all()


# --------------------------------------------------------------------------- semantics


def test_zero_init_is_identity():
    m = tiny()
    x, t, y = inputs()
    cells = m.seed_cells(x)
    out = m.evolve(cells, t, y)
    assert torch.equal(out, cells)


@pytest.mark.parametrize("update_prob", [1.0, 0.5])
def test_equivalent_to_original_structure(update_prob):
    torch.manual_seed(0)
    m = perturb_(tiny(update_prob=update_prob)).eval()
    ref = _original_for(m)
    x, t, y = inputs(B=2, H=6, W=7)
    cells = m.seed_cells(x)
    cells[:, 12:] = 0.3 * torch.randn_like(cells[:, 12:])  # nonzero hidden too
    steps, seed = 12, 1234567
    masks = None if update_prob >= 1 else [fastnca.fire_mask(2, 6, 7, update_prob, seed, step=i) for i in range(steps)]
    ours = m.evolve(cells, t, y, steps=steps, seed=seed)
    theirs = ref(cells, t, y, steps, masks)
    assert ours.shape == theirs.shape
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-5 * scale)
    assert not torch.allclose(ours, cells)  # the test would be vacuous otherwise


@pytest.mark.parametrize("backend", fast_backends("neighborhood_attention"))
def test_equivalence_other_backends(backend):
    # The reference backend is held to the original structure above; a fast backend is
    # held to the reference (both are ~3e-7 relative from a float64 run of the model),
    # on the final cells and on the gradients of every parameter and of the start cells.
    device = device_for(backend)
    m = perturb_(tiny(), seed=3).to(device).eval()
    x, t, y = (z.to(device) for z in inputs(B=2, H=5, W=6, seed=4))
    cells = m.seed_cells(x)
    cells[:, 12:] = 0.3 * torch.randn_like(cells[:, 12:])
    w = torch.randn_like(cells)  # a loss that weighs every cell and channel differently
    results = {}
    for name in ("reference", backend):
        m.backend = name
        m.zero_grad(set_to_none=True)
        start = cells.clone().requires_grad_(True)
        out = m.evolve(start, t, y, steps=4, seed=77)
        (out * w).sum().backward()
        results[name] = out.detach(), start.grad, {n: p.grad for n, p in m.named_parameters()}
    (ref, ref_dcells, ref_grads), (ours, dcells, grads) = results["reference"], results[backend]
    assert_close(ours, ref, torch.float32, "cells")
    assert_close(dcells, ref_dcells, torch.float32, "d cells")
    for n, g in ref_grads.items():
        assert g is not None and g.abs().sum() > 0, n
        assert_close(grads[n], g, torch.float32, f"d {n}")
    assert not torch.allclose(ours, cells)


def test_gradients_flow_and_checkpoint_matches():
    x, t, y = inputs(B=2, H=5, W=6)
    grads = {}
    for ckpt in (True, False):
        m = perturb_(tiny(class_dropout_prob=0.0)).train()
        m.checkpoint_steps = ckpt
        torch.manual_seed(0)  # same centre-cell seed values in both runs
        out = m(x, t, y, seed=99, steps=4)
        (out ** 2).mean().backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in m.named_parameters()}
        for n, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-6)


def test_checkpoint_saves_one_step_of_activations():
    def saved_bytes(ckpt, steps):
        m = perturb_(tiny(class_dropout_prob=0.0)).train()
        m.checkpoint_steps = ckpt
        x, t, y = inputs(B=2, H=8, W=8)
        total = [0]

        def pack(tensor):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor.detach()  # a saved output would otherwise hold its own graph

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda z: z):
            m(x, t, y, steps=steps, seed=5)
        return total[0]

    plain = saved_bytes(False, 8) - saved_bytes(False, 4)
    ck = saved_bytes(True, 8) - saved_bytes(True, 4)
    # each checkpointed step keeps its input cells (+ mask); each plain step keeps every activation
    assert ck * 10 < plain


def test_label_dropout_train_only():
    m = tiny(class_dropout_prob=0.5)
    y = torch.ones(64, 5)
    m.eval()
    assert torch.equal(m.y_embedder(y), m.y_embedder(y))
    m.train()
    torch.manual_seed(0)
    e1 = m.y_embedder(y)
    assert not torch.equal(e1, m.y_embedder.embedding_table(y))
    null = m.y_embedder.embedding_table(torch.zeros(1, 5))
    assert any(torch.allclose(r, null[0]) for r in e1)  # some rows dropped fully: the null label


def test_label_dropout_is_per_entry():
    """GeCA drops single label entries (rand(B, ncls) < p), not whole rows."""
    m = tiny(class_dropout_prob=0.3).train()
    seen = []
    m.y_embedder.embedding_table[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    torch.manual_seed(0)
    m.y_embedder(torch.ones(4096, 5))
    kept = seen[0]
    assert set(kept.unique().tolist()) == {0.0, 1.0}
    assert abs((kept == 0).float().mean().item() - 0.3) < 0.02
    per_row = (kept == 0).sum(1)
    assert ((per_row > 0) & (per_row < 5)).float().mean() > 0.5  # most dropped rows only in part


def test_position_embedding_odd_channels_use_own_index():
    from fastnca.models.geca import position_embedding_1d
    pe = position_embedding_1d(10, 8)
    n, c = 7, 3
    assert pe[n, c].item() == pytest.approx(math.cos(n * math.exp(-math.log(1e4) * c / 8)), abs=1e-6)
    assert pe[n, 2].item() == pytest.approx(math.sin(n * math.exp(-math.log(1e4) * 2 / 8)), abs=1e-6)


# --------------------------------------------------------------------------- diffusion


def test_space_timesteps_and_respacing():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and 0 in kept and 999 in kept
    assert space_timesteps(100, "10,20") == {round(i * 49 / 9) for i in range(10)} | {50 + round(i * 49 / 19) for i in range(20)}
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    full, sp = create_diffusion(""), create_diffusion("250")
    assert full.num_timesteps == 1000 and sp.num_timesteps == 250
    assert full.betas[0].item() == pytest.approx(1e-4) and full.betas[-1].item() == pytest.approx(2e-2)
    idx = sp.timestep_map
    torch.testing.assert_close(sp.alphas_cumprod, full.alphas_cumprod[idx], rtol=1e-12, atol=0)


def test_vb_terms():
    d = create_diffusion("")
    x0 = torch.rand(3, 4, 4, 4) * 2 - 1
    t = torch.tensor([0, 10, 500])
    xt = d.q_sample(x0, t)
    # a perfect model (true epsilon, v = -1 -> posterior variance) has zero KL for t > 0
    eps = (xt - d._at(d.sqrt_alphas_cumprod, t, x0) * x0) / d._at(d.sqrt_one_minus_alphas_cumprod, t, x0)
    vb = d.vb_terms_bpd(torch.cat([eps, -torch.ones_like(eps)], 1), x0, xt, t)
    assert vb[1:].abs().max() < 1e-3
    assert vb[0] > 0  # t = 0: decoder NLL in bits, positive
    assert normal_kl(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2)).abs().max() == 0
    ll = discretized_gaussian_log_likelihood(torch.tensor([-1.0, 0.0, 1.0]), torch.zeros(3), torch.full((3,), -3.0))
    assert (ll <= 0).all()


def test_training_losses_vb_does_not_train_the_mean():
    d = create_diffusion("")
    m = perturb_(tiny(class_dropout_prob=0.0))
    x0, _, y = inputs(B=2, H=5, W=5)
    t = torch.tensor([3, 700])
    out = d.training_losses(m, x0.clamp(-1, 1), t, y, steps=2, seed=1)
    assert set(out) >= {"loss", "mse", "vb"} and torch.isfinite(out["loss"]).all()
    captured = {}

    def model(xt, tt, yy):
        o = torch.randn(2, 8, 5, 5, requires_grad=True)
        captured["o"] = o
        return o

    d.training_losses(model, x0, t, y)["vb"].sum().backward()
    g = captured["o"].grad
    assert (g[:, :4] == 0).all() and g[:, 4:].abs().sum() > 0


def test_cfg_changes_only_epsilon_channels():
    cond, uncond = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    out = cfg_combine(torch.cat([cond, uncond]), 1.5, 4)
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 1.5 * (cond[:, :4] - uncond[:, :4]))
    assert torch.equal(out[:, 4:], cond[:, 4:])
    torch.testing.assert_close(cfg_combine(torch.cat([cond, uncond]), 1.0, 4), cond)


def test_heredity_cells_carry_hidden_reseed_out():
    m = tiny()
    prev = torch.randn(2, 20, 5, 5)
    g = torch.Generator().manual_seed(0)
    c = heredity_cells(m, prev, "hidden", g)
    assert torch.equal(c[:, 12:], prev[:, 12:])
    outc = c[:, 4:12]
    assert (outc[:, :, 2, 2] != 0).all() and not torch.equal(outc[:, :, 2, 2], prev[:, 4:12, 2, 2])
    outc = outc.clone()
    outc[:, :, 2, 2] = 0
    assert (outc == 0).all()
    both = heredity_cells(m, prev, "out+hidden", g)
    assert torch.equal(both[:, 4:], prev[:, 4:])
    none = heredity_cells(m, prev, "none", g)
    assert (none[:, 12:] == 0).all()
    with pytest.raises(ValueError, match="carry must be one of"):
        heredity_cells(m, prev, "all", g)


class _Recorder(nn.Module):
    """Wraps a GeCA and records the start and final cells of every call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = []
        self.in_channels, self.out_channels = model.in_channels, model.out_channels

    def seed_cells(self, *a, **k):
        return self.model.seed_cells(*a, **k)

    def forward(self, x, t, y, cells=None, **kw):
        out, final = self.model(x, t, y, cells=cells, **kw)
        self.calls.append(dict(x=x.clone(), y=y.clone(), start=None if cells is None else cells.clone(),
                               final=final.clone()))
        return out, final


@pytest.mark.parametrize("cfg,ghg,carried", [(1.5, True, "hidden"), (1.0, True, "out+hidden"), (1.5, False, "none")])
def test_sampler_gene_heredity(cfg, ghg, carried):
    d = create_diffusion("4")
    rec = _Recorder(perturb_(tiny()).eval())
    y = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 0, 1]])
    x0 = d.sample(rec, y, (2, 4, 5, 5), cfg_scale=cfg, ghg=ghg, ca_steps=2, generator=torch.Generator().manual_seed(0))
    assert x0.shape == (2, 4, 5, 5) and torch.isfinite(x0).all()
    assert len(rec.calls) == 4
    B = 4 if cfg != 1.0 else 2
    for prev, cur in zip(rec.calls, rec.calls[1:]):
        assert cur["start"].shape[0] == B
        if cfg != 1.0:
            assert torch.equal(cur["x"][:2], cur["x"][2:]) and (cur["y"][2:] == 0).all()
        hid_same = torch.equal(cur["start"][:, 12:], prev["final"][:, 12:])
        out_same = torch.equal(cur["start"][:, 4:12], prev["final"][:, 4:12])
        assert hid_same == (carried in ("hidden", "out+hidden"))
        assert out_same == (carried == "out+hidden")
        if carried == "none":
            assert (cur["start"][:, 12:] == 0).all()
        if not out_same:  # re-seeded: zero except the centre cell
            o = cur["start"][:, 4:12].clone()
            assert (o[:, :, 2, 2] != 0).all()
            o[:, :, 2, 2] = 0
            assert (o == 0).all()


def test_sampler_timesteps_and_guidance():
    """The model sees the original timestep of each respaced step (timestep_map), and the
    posterior gets cfg_combine of the model's conditional and unconditional halves."""
    d = create_diffusion("4")
    m = perturb_(tiny()).eval()
    seen_t, seen_out, seen_pm = [], [], []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.in_channels, self.out_channels = m, m.in_channels, m.out_channels

        def seed_cells(self, *a, **k):
            return m.seed_cells(*a, **k)

        def forward(self, x, t, y, **kw):
            seen_t.append(t.clone())
            out, cells = m(x, t, y, **kw)
            seen_out.append(out.float().clone())
            return out, cells

    real_pm = d.p_mean_variance
    d.p_mean_variance = lambda out, x, t, **kw: seen_pm.append(out.clone()) or real_pm(out, x, t, **kw)
    y = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 0, 1]])
    d.sample(Spy(), y, (2, 4, 5, 5), cfg_scale=2.5, ca_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(seen_t) == 4
    for i, t in zip(range(3, -1, -1), seen_t):
        assert t.tolist() == [int(d.timestep_map[i])] * 4  # doubled batch: cond and uncond
    assert d.timestep_map.tolist() != list(range(4))  # a respaced schedule: the map matters
    for out, pm in zip(seen_out, seen_pm):
        torch.testing.assert_close(pm, cfg_combine(out, 2.5, 4), rtol=0, atol=0)
        assert not torch.equal(pm[:, :4], out[:2, :4])  # guidance changed epsilon


def test_seed_cells_and_sampler_check_channels():
    m = tiny()
    with pytest.raises(ValueError, match="in_channels=4"):
        m.seed_cells(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="in_channels=4"):
        create_diffusion("2").sample(m, torch.ones(2, 5), (2, 3, 6, 6), ca_steps=1)


def test_inference_mode_pass_then_training():
    """A validation pass under torch.inference_mode() builds the position table first; a
    later training step (checkpointed steps save it for backward) must still run."""
    for checkpoint_steps in (True, False):
        m = GeCA(GeCAConfig(**TINY), checkpoint_steps=checkpoint_steps)
        x, t, y = inputs()
        with torch.inference_mode():
            m.eval()(x, t, y, seed=0)
        m.train()(x, t, y, seed=0).sum().backward()
        assert m.cell_to_embedding.weight.grad is not None


def test_sampler_repeatable_with_generator():
    d = create_diffusion("3")
    m = perturb_(tiny()).eval()
    y = torch.ones(1, 5)
    a = d.sample(m, y, (1, 4, 4, 4), generator=torch.Generator().manual_seed(7), ca_steps=2)
    b = d.sample(m, y, (1, 4, 4, 4), generator=torch.Generator().manual_seed(7), ca_steps=2)
    assert torch.equal(a, b)


def test_sampler_progress_without_tqdm(monkeypatch):
    """progress=True with tqdm not installed (it is in the [examples] extra only) samples
    without a bar; it raised ModuleNotFoundError."""
    import sys

    d = create_diffusion("2")
    m = perturb_(tiny()).eval()
    y = torch.ones(1, 5)
    want = d.sample(m, y, (1, 4, 4, 4), generator=torch.Generator().manual_seed(7), ca_steps=1)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    got = d.sample(m, y, (1, 4, 4, 4), generator=torch.Generator().manual_seed(7), ca_steps=1, progress=True)
    assert torch.equal(got, want)


def test_sampler_with_a_bfloat16_model_and_one_step():
    """The chain stays float32 while a bfloat16 model gets its inputs in bfloat16 (it raised a
    dtype mismatch), and a respacing to a single step samples (its log-variance table was
    empty)."""
    m = perturb_(tiny()).eval()
    y = torch.ones(1, 5)
    ref = d1 = create_diffusion("1")
    assert d1.num_timesteps == 1
    x = d1.sample(m, y, (1, 4, 4, 4), generator=torch.Generator().manual_seed(3), ca_steps=2)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    mh = m.to(torch.bfloat16)
    half = ref.sample(mh, y, (1, 4, 4, 4), generator=torch.Generator().manual_seed(3), ca_steps=2)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, x, rtol=5e-3, atol=5e-3)  # the same chain at bfloat16 precision
    # the tolerance can tell a sampler that ignores the model (its output zeroed) from it
    real_forward = type(mh).forward
    zeroed = lambda self, *a, **kw: tuple(t * 0 if i == 0 else t for i, t in enumerate(real_forward(self, *a, **kw)))  # noqa: E731
    try:
        type(mh).forward = zeroed
        blind = ref.sample(mh, y, (1, 4, 4, 4), generator=torch.Generator().manual_seed(3), ca_steps=2)
    finally:
        type(mh).forward = real_forward
    assert (blind - x).abs().max() > 5e-3 * (1 + x.abs().max())


def test_forward_checks_t_and_y():
    m = perturb_(tiny()).eval()
    x, y = torch.randn(2, 4, 5, 5), torch.eye(5)[:2]
    cells = m.seed_cells(x, generator=torch.Generator().manual_seed(0))
    out = m(x, torch.tensor([7, 7]), y, cells=cells, seed=1)
    for t in (7, torch.tensor(7), torch.tensor([7])):  # one timestep for the batch is broadcast
        torch.testing.assert_close(m(x, t, y, cells=cells, seed=1), out)
    with pytest.raises(ValueError, match=r"t must be \[B\] = \[2\] timesteps"):
        m(x, torch.tensor([[7], [7]]), y, seed=1)
    with pytest.raises(ValueError, match=r"y must be \[B, num_classes\] = \[2, 5\]"):
        m(x, torch.tensor([7, 7]), torch.eye(4)[:2], seed=1)
    with pytest.raises(TypeError, match="config must be a GeCAConfig"):
        GeCA(dict(TINY))
    # x and cells: named, with the expected shape (were a raw broadcast error / unpack error)
    with pytest.raises(ValueError, match=r"x must be \[B, 4, H, W\]"):
        m(torch.randn(2, 3, 5, 5), torch.tensor([7, 7]), y, seed=1)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        m(x[0], torch.tensor([7, 7]), y, seed=1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        m(x.tolist(), torch.tensor([7, 7]), y, seed=1)
    with pytest.raises(ValueError, match=r"cells must be \[2, C, 5, 5\] like x"):
        m(x, torch.tensor([7, 7]), y, cells=cells[:, :, :4], seed=1)


def test_tiny_model_overfits():
    torch.manual_seed(0)
    d = create_diffusion("")
    m = tiny(embed_dim=32, heads=2, dim_head=16, mlp_dim=64, hidden_channels=8, class_dropout_prob=0.0)
    m.train()
    m.checkpoint_steps = False
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(4, 4, 8, 8, generator=g) * 2 - 1)
    y = torch.eye(5)[:4]
    t = torch.tensor([50, 200, 400, 600])
    noise = torch.randn(4, 4, 8, 8, generator=g)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for it in range(40):  # ~1 s on an idle core; fixed count so a loaded machine is only slower
        loss = d.training_losses(m, x0, t, y, noise=noise, steps=4)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last, len(losses))


# ---------------------------------------------------------------- the diffusion's fixed facts


class _FixedOutput(nn.Module):
    """A stand-in model: a fixed (learnable) output [eps | v], the GeCA call signature."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = nn.Parameter(out.clone())
        self.in_channels = self.out_channels = out.shape[1] // 2

    def seed_cells(self, x, generator=None):
        return x

    def forward(self, x, t, y, cells=None, steps=None, seed=None, return_cells=False):
        out = self.out[: x.shape[0]] * (1 + 0.1 * x.mean())  # depends on x_t, as a model does
        return (out, cells) if return_cells else out


def test_hybrid_loss_is_mse_plus_vb_and_trains_both_halves():
    """GECA.md: loss = MSE on epsilon + the variational bound (improved DDPM's hybrid); the
    MSE trains eps, the VB trains the variance channels."""
    diff = create_diffusion(num_timesteps=50)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 4, 6, 6, generator=g) * 2 - 1
    model = _FixedOutput(torch.randn(3, 8, 6, 6, generator=g))
    t = torch.tensor([0, 7, 49])
    losses = diff.training_losses(model, x0, t, torch.zeros(3, 5))
    assert torch.equal(losses["loss"], losses["mse"] + losses["vb"])
    losses["loss"].sum().backward()
    assert model.out.grad[:, :4].abs().sum() > 0 and model.out.grad[:, 4:].abs().sum() > 0


def test_sample_timesteps_cover_every_step():
    diff = create_diffusion(num_timesteps=20)
    t = diff.sample_timesteps(2000, generator=torch.Generator().manual_seed(1))
    assert t.min() == 0 and t.max() == 19  # t = 0 trains the decoder term


def test_sampler_steps_are_mean_plus_std_noise_and_the_last_is_the_mean():
    """Ancestral sampling: x_{t-1} = mean + exp(log_var / 2) z with fresh z, and no noise at
    the last step (t = 0): checked against the chain rebuilt by hand from the same draws."""
    from fastnca.models.geca_diffusion import draw_seed

    diff = create_diffusion(num_timesteps=4)
    g = torch.Generator().manual_seed(2)
    model = _FixedOutput(torch.randn(2, 8, 5, 5, generator=g) * 0.5)
    noise = torch.randn(2, 4, 5, 5, generator=g)
    y = torch.zeros(2, 5)
    got = diff.sample(model, y, noise=noise, cfg_scale=1.0, ghg=False, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x = noise
    for i in (3, 2, 1, 0):
        t = torch.full((2,), i)
        pm = diff.p_mean_variance(model(x, diff.model_timesteps(t), y).detach(), x, t)
        draw_seed(g)  # the CA's fire-mask seed of this step
        x = pm["mean"] + (torch.exp(0.5 * pm["log_variance"]) * torch.randn(x.shape, generator=g) if i else 0)
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-6)


def test_decoder_likelihood_is_the_gaussian_mass_of_the_bin():
    """log P(x) of a 256-level pixel: the mass of [x - 1/255, x + 1/255] (edge bins to
    +-inf), to the tanh CDF approximation's accuracy."""
    g = torch.Generator().manual_seed(4)
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0]).double()
    means = x + 0.05 * torch.randn(5, generator=g, dtype=torch.float64)
    log_scales = torch.full((5,), math.log(0.04), dtype=torch.float64)
    s = torch.exp(log_scales)
    hi, lo = torch.special.ndtr((x - means + 1 / 255) / s), torch.special.ndtr((x - means - 1 / 255) / s)
    exact = torch.where(x < -0.999, hi.log(), torch.where(x > 0.999, (1 - lo).log(), (hi - lo).log()))
    torch.testing.assert_close(discretized_gaussian_log_likelihood(x, means, log_scales), exact, rtol=0, atol=2e-2)


def test_final_layer_norm_epsilon():
    """GECA.md: the final LayerNorm has no affine parameters and eps 1e-6."""
    norm = tiny().final_layer.norm_final
    assert norm.eps == 1e-6 and not norm.elementwise_affine


# Adversarial input review (session 19, "badinput"): these failed when written.

@pytest.mark.parametrize("shape", [(2, 4, 0, 5), (2, 4, 5, 0)])
def test_forward_checks_empty_grids(shape):
    """x with H or W = 0 raised IndexError in seed_cells ("index 0 is out of bounds for
    dimension 2 with size 0")."""
    m = tiny()
    with pytest.raises(ValueError, match=r"(?s)^(?=.*\bx\b)(?=.*\bH\b)"):
        m(torch.randn(*shape), torch.tensor([7, 7]), torch.eye(5)[:2], seed=1)


def test_evolve_checks_cells():
    """evolve() on a 3-D or a non-tensor cells failed with "not enough values to unpack
    (expected 4, got 3)" / AttributeError."""
    m = tiny()
    t, y = torch.tensor([7, 7]), torch.eye(5)[:2]
    with pytest.raises(ValueError, match=r"\bcells\b"):
        m.evolve(torch.randn(44, 5, 5), t, y, seed=1)
    with pytest.raises(TypeError, match=r"cells must be a torch.Tensor"):
        m.evolve(torch.randn(2, 44, 5, 5).numpy(), t, y, seed=1)


def test_forward_checks_t_type():
    """t=None / a string failed inside torch.as_tensor ("Could not infer dtype of NoneType",
    "new(): invalid data type 'str'")."""
    m = tiny()
    x, y = torch.randn(2, 4, 5, 5), torch.eye(5)[:2]
    for bad in (None, "7"):
        with pytest.raises(TypeError, match=r"\bt\b"):
            m(x, bad, y, seed=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_forward_input_dtype_is_named(dtype):
    """x (or cells) of another dtype than the model failed in the first Linear ("expected m1
    and m2 to have the same dtype, but got: double != float"). Either it runs (a float x
    cast to the model's dtype) or the error names x and its dtype."""
    m = perturb_(tiny()).eval()
    x, t, y = torch.randn(2, 4, 5, 5), torch.tensor([7, 7]), torch.eye(5)[:2]
    try:
        out = m(x.to(dtype), t, y, seed=1)
    except TypeError as e:
        assert "x" in str(e) and str(dtype).replace("torch.", "") in str(e), str(e)
    else:
        assert dtype.is_floating_point, "an integer x must not be accepted silently"
        torch.testing.assert_close(out.float(), m(x, t, y, seed=1), rtol=1e-4, atol=1e-4)


def test_forward_checks_devices():
    """x / y on another device than the model failed with torch's internal "Tensor on device
    cpu is not on the expected device meta!"."""
    m = tiny()
    x, t, y = torch.randn(2, 4, 5, 5), torch.tensor([7, 7]), torch.eye(5)[:2]
    with pytest.raises(ValueError, match=r"(?s)^(?=.*\bx\b)(?=.*\bmeta\b)"):
        m(x.to("meta"), t, y, seed=1)
    with pytest.raises(ValueError, match=r"(?s)^(?=.*\by\b)(?=.*\bmeta\b)"):
        m(x, t, y.to("meta"), seed=1)


def test_constructor_checks_the_backend_name():
    """GeCA(backend="gpu") was accepted and failed at the first forward; fastnca.nn's modules
    check the name when built."""
    with pytest.raises(ValueError, match="backend must be None or one of"):
        GeCA(GeCAConfig(**TINY), backend="gpu")


def test_space_timesteps_uneven_sections():
    """When T does not divide into the sections, the first sections are one step longer
    (improved DDPM): 10 steps in 3 sections are 4 + 3 + 3, 13 in 2 are 7 + 6."""
    assert space_timesteps(10, "2,2,2") == {0, 3, 4, 6, 7, 9}
    assert space_timesteps(13, "3,2") == {0, 3, 6, 7, 12}


def test_training_losses_give_the_model_the_original_timesteps():
    """On a respaced diffusion, training_losses indexes its own steps with t but the model
    sees timestep_map[t] (as the sampler does)."""
    d = create_diffusion("10")
    seen = []

    class Spy(_FixedOutput):
        def forward(self, x, t, y, **kw):
            seen.append(t.clone())
            return super().forward(x, t, y, **kw)

    model = Spy(torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(0)))
    t = torch.tensor([0, 4, 9])
    d.training_losses(model, torch.rand(3, 4, 4, 4) * 2 - 1, t, torch.zeros(3, 5))
    assert seen[0].tolist() == d.timestep_map[t].tolist() != t.tolist()


def test_vb_term_is_rescaled_by_T_over_1000():
    """The hybrid loss scales L_vb by num_timesteps / 1000 (improved DDPM's rescaled hybrid)."""
    d = create_diffusion(num_timesteps=50)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 4, 4, 4, generator=g) * 2 - 1
    model = _FixedOutput(torch.randn(2, 8, 4, 4, generator=g))
    noise = torch.randn(2, 4, 4, 4, generator=g)
    t = torch.tensor([0, 30])
    losses = d.training_losses(model, x0, t, torch.zeros(2, 5), noise=noise)
    xt = d.q_sample(x0, t, noise)
    raw = d.vb_terms_bpd(model(xt, t, None).detach(), x0, xt, t)
    torch.testing.assert_close(losses["vb"].detach(), raw * 0.05, rtol=1e-6, atol=0)


def test_posterior_log_variance_clipped_to_the_t1_value():
    """GECA.md: the learned range's lower end is log(beta_tilde_t), its t = 0 entry (0)
    clipped to the t = 1 value; the upper end is log(beta_t)."""
    for d in (create_diffusion(num_timesteps=20), create_diffusion("5")):
        pv = d.posterior_variance
        want = torch.cat([pv[1:2], pv[1:]]).log()
        torch.testing.assert_close(d.posterior_log_variance_clipped, want, rtol=1e-12, atol=0)
        xt = torch.zeros(d.num_timesteps, 4, 2, 2)
        t = torch.arange(d.num_timesteps)
        lo = d.p_mean_variance(torch.cat([xt, -torch.ones_like(xt)], 1), xt, t)["log_variance"]
        hi = d.p_mean_variance(torch.cat([xt, torch.ones_like(xt)], 1), xt, t)["log_variance"]
        torch.testing.assert_close(lo[:, 0, 0, 0], want.float(), rtol=1e-6, atol=0)
        torch.testing.assert_close(hi[:, 0, 0, 0], d.betas.log().float(), rtol=1e-6, atol=0)


def test_forward_replaces_the_x_t_channels_of_given_cells():
    """forward(x, cells=...) starts from the given cells with their x_t channels replaced
    by x (Gene Heredity: the carried cells hold the previous step's x_t)."""
    m = perturb_(tiny()).eval()
    x, t, y = inputs(B=2, H=5, W=5, seed=3)
    cells = m.seed_cells(torch.randn_like(x), generator=torch.Generator().manual_seed(0))
    cells[:, 12:] = 0.3 * torch.randn_like(cells[:, 12:])
    _, final = m(x, t, y, cells=cells, steps=4, seed=4, return_cells=True)
    assert torch.equal(final[:, :4], x)
    start = torch.cat([x, cells[:, 4:]], 1)
    torch.testing.assert_close(final, m.evolve(start, t, y, steps=4, seed=4), rtol=0, atol=0)


def test_label_embedder_train_argument_overrides_the_mode():
    """y_embedder(y, train=...) drops labels as asked whatever the module's mode."""
    m = tiny(class_dropout_prob=0.5)
    y = torch.ones(256, 5)
    full = m.y_embedder.embedding_table(y)
    m.eval()
    torch.manual_seed(0)
    assert not torch.equal(m.y_embedder(y, train=True), full)
    m.train()
    assert torch.equal(m.y_embedder(y, train=False), full)


def test_sampler_guides_with_a_scale_below_one():
    """Any cfg_scale != 1 guides (0 = unconditional, 0.5 = between): the batch is doubled with
    the null label and the posterior gets cfg_combine at that scale."""
    d = create_diffusion("2")
    rec = _Recorder(perturb_(tiny()).eval())
    y = torch.tensor([[1.0, 0, 1, 0, 0]])
    seen = []
    real_pm = d.p_mean_variance
    d.p_mean_variance = lambda out, x, t, **kw: seen.append(out.clone()) or real_pm(out, x, t, **kw)
    d.sample(rec, y, (1, 4, 4, 4), cfg_scale=0.5, ca_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(rec.calls) == 2
    for call, out in zip(rec.calls, seen):
        assert call["x"].shape[0] == 2 and (call["y"][1:] == 0).all()
        outs = call["final"][:, 4:12]
        torch.testing.assert_close(out, cfg_combine(outs, 0.5, 4), rtol=0, atol=0)


def test_position_table_follows_the_grid_shape():
    """One model called on grids of the same height and other widths uses each grid's own
    position table (equal to a fresh model's result)."""
    m = perturb_(tiny()).eval()
    fresh = perturb_(tiny()).eval()
    for H, W in ((5, 5), (5, 7), (4, 7)):
        x, t, y = inputs(B=1, H=H, W=W, seed=H * W)
        cells = m.seed_cells(x, generator=torch.Generator().manual_seed(0))
        fresh._pos_cache = {}
        torch.testing.assert_close(m.evolve(cells, t, y, steps=2, seed=1),
                                   fresh.evolve(cells, t, y, steps=2, seed=1), rtol=0, atol=0)


def test_attention_kernel_size_of_the_config():
    """GeCAConfig(kernel_size=5): the model's attention is a 5x5 neighbourhood with zero
    keys and values outside the grid (checked with F.unfold, as the 3x3 original)."""
    m = perturb_(tiny(kernel_size=5)).eval()
    attn = m.transformer.layers[0][0].fn
    B, H, W, h, d = 1, 6, 7, attn.heads, attn.dim_head
    xs = torch.randn(B, H, W, h * d)
    q, k, v = (z.reshape(B, H * W, h, d).transpose(1, 2) for z in attn.to_qkv(xs).chunk(3, dim=-1))

    def unfold(z):  # [b, h, n, d] -> [b, h, d, 25, n], zero outside the grid
        return F.unfold(z.transpose(2, 3).reshape(B * h, d, H, W), 5, padding=2).view(B, h, d, 25, H * W)

    a = (torch.einsum("bhnd,bhdjn->bhnj", q, unfold(k)) * d ** -0.5).softmax(-1)
    o = torch.einsum("bhnj,bhdjn->bhnd", a, unfold(v)).transpose(1, 2).reshape(B, H, W, h * d)
    with torch.no_grad():
        torch.testing.assert_close(attn(xs), attn.to_out(o), rtol=1e-5, atol=1e-5)


def test_timestep_embedding_odd_dim_is_zero_padded():
    """An odd frequency dim gets the even-dim features plus one zero column (as DiT), so a
    GeCAConfig(freq_dim=odd) model runs."""
    from fastnca.models.geca import timestep_embedding

    t = torch.tensor([0, 3, 999])
    odd, even = timestep_embedding(t, 7), timestep_embedding(t, 6)
    assert odd.shape == (3, 7)
    torch.testing.assert_close(odd[:, :6], even, rtol=0, atol=0)
    assert (odd[:, 6] == 0).all()
    x, t, y = inputs(B=2, H=4, W=4)
    assert tiny(freq_dim=255)(x, t, y, steps=1, seed=0).shape == (2, 8, 4, 4)


def test_load_original_state_dict_non_strict():
    """strict=False loads the matching keys of a partial checkpoint with an extra key and
    reports both, as torch's load_state_dict does."""
    src = perturb_(tiny())
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("final_layer.")}
    sd["pos_embed"] = torch.zeros(1)
    m = tiny()
    res = m.load_original_state_dict({"ema": sd, "model": sd}, strict=False)
    assert "pos_embed" in res.unexpected_keys and "final_layer.linear.weight" in res.missing_keys
    assert torch.equal(m.cell_to_embedding.weight, src.cell_to_embedding.weight)
    with pytest.raises(RuntimeError):
        m.load_original_state_dict(sd)


def test_heredity_cells_carry_out_only():
    """The "out" ablation carries the out channels and starts the hidden ones at zero."""
    m = tiny()
    prev = torch.randn(2, 20, 5, 5)
    c = heredity_cells(m, prev, "out", torch.Generator().manual_seed(0))
    assert torch.equal(c[:, 4:12], prev[:, 4:12]) and (c[:, 12:] == 0).all()


def test_clip_denoised_clamps_the_predicted_x0_to_the_data_range():
    """clip_denoised=True clamps pred_xstart to [-1, 1] (the data range) before the
    posterior mean; False leaves it."""
    d = create_diffusion(num_timesteps=20)
    g = torch.Generator().manual_seed(5)
    xt = 3 * torch.randn(2, 4, 3, 3, generator=g)
    mo = torch.randn(2, 8, 3, 3, generator=g)
    t = torch.tensor([2, 15])
    raw = d.p_mean_variance(mo, xt, t)
    clipped = d.p_mean_variance(mo, xt, t, clip_denoised=True)
    assert raw["pred_xstart"].min() < -1 and raw["pred_xstart"].max() > 1
    torch.testing.assert_close(clipped["pred_xstart"], raw["pred_xstart"].clamp(-1, 1), rtol=0, atol=0)
    mean, _, _ = d.q_posterior_mean_variance(raw["pred_xstart"].clamp(-1, 1), xt, t)
    torch.testing.assert_close(clipped["mean"], mean, rtol=0, atol=0)


def test_space_timesteps_ddim_takes_the_smallest_stride():
    """"ddimN" keeps range(0, T, stride) for the stride giving exactly N steps, stride 1
    included."""
    assert space_timesteps(10, "ddim10") == set(range(10))
    assert space_timesteps(10, "ddim5") == {0, 2, 4, 6, 8}
    with pytest.raises(ValueError, match="exactly 7 steps"):
        space_timesteps(10, "ddim7")
