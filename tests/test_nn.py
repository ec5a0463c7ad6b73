"""fastnca.nn modules and backend reporting."""
import pytest
import torch

import fastnca
from fastnca.nn import NCA, NeighborhoodAttention2d


def test_backends_report():
    status = fastnca.backends()
    assert set(status) == {"reference", "cpu", "cuda", "triton"}
    assert status["reference"] is True
    for name, s in status.items():
        assert s is True or (isinstance(s, str) and s), name


def test_nca_module_fresh_rule_is_identity_and_trains():
    torch.manual_seed(0)
    nca = NCA(8, hidden=16, frozen_channels=1)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(nca(x, steps=4), x)  # zero-initialised fc2
    torch.nn.init.normal_(nca.fc2_weight, std=0.1)
    target = torch.randn(2, 7, 6, 6)
    opt = torch.optim.Adam(nca.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = (nca(x, steps=4, seed=3)[:, 1:] - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert torch.equal(nca(x, 4)[:, :1], x[:, :1])


def test_nca_module_seed_follows_manual_seed():
    nca = NCA(4, hidden=8, groups=4, padding="circular")
    torch.nn.init.normal_(nca.fc2_weight)
    x = torch.randn(1, 4, 5, 5)
    torch.manual_seed(5)
    a = nca(x, 3)
    torch.manual_seed(5)
    b = nca(x, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, nca(x, 3))


def test_neighborhood_attention_module():
    torch.manual_seed(0)
    attn = NeighborhoodAttention2d(16, 4, backend="reference")
    x = torch.randn(2, 5, 6, 16, requires_grad=True)
    y = attn(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.abs().sum() > 0 and attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="x must have shape"):
        attn(torch.randn(2, 5, 6, 8))
    with pytest.raises(ValueError, match="divisible"):
        NeighborhoodAttention2d(10, 4)


def test_import_without_compiled_modules():
    """A missing fastnca._C / _C_cuda is a supported configuration: import works, backends()
    says why, and auto-selection falls back to the reference backend."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['fastnca._C'] = None; sys.modules['fastnca._C_cuda'] = None\n"
        "import torch, fastnca\n"
        "s = fastnca.backends()\n"
        "assert isinstance(s['cpu'], str) and 'not importable' in s['cpu'], s\n"
        "assert isinstance(s['cuda'], str), s\n"
        "m = fastnca.fire_mask(2, 3, 4, 0.5, seed=1)\n"
        "x = torch.randn(1, 2, 3, 3)\n"
        "y = fastnca.nca_step(x, torch.randn(4, 2, 3, 3), None, torch.randn(4, 6), None, torch.randn(2, 4), seed=0)\n"
        "q = torch.randn(1, 3, 3, 1, 4)\n"
        "o = fastnca.neighborhood_attention2d(q, q, q)\n"
        "try:\n"
        "    fastnca.fire_mask(1, 1, 1, 0.5, seed=0, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'not importable' in str(e)\n"
        "else:\n"
        "    raise AssertionError('cpu backend should be unusable')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
