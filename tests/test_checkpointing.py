"""Activation checkpointing: same gradients as without it (single process here; the parallel cases with halo
exchanges recomputed during backward are in test_parity.py), and it really stores less."""

from __future__ import annotations

import copy

import torch

import parallel_vae as pv
from tests.cases import Case, make_inputs, make_model


def _run(vae, x, w):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = vae.decode(vae.encode(x).latent_dist.mode()).sample
    (out * w).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in vae.named_parameters()}, sum(saved)


def test_checkpointing_same_gradients_and_less_saved_memory():
    torch.set_num_threads(1)
    case = Case("wan2.2", "float64", latent_h=3, frames=9)
    x, w = make_inputs(case, torch.float64)
    plain = make_model(case.layout, torch.float64)
    ckpt = pv.enable_gradient_checkpointing(make_model(case.layout, torch.float64))
    off = pv.enable_gradient_checkpointing(make_model(case.layout, torch.float64), offload=True)
    a, b, o = _run(plain, x, w), _run(ckpt, x, w), _run(off, x, w)
    for other in (b, o):
        assert torch.equal(a[0], other[0]) and torch.equal(a[1], other[1])
        for n in a[2]:
            assert torch.equal(a[2][n], other[2][n]), n
    # Saved-for-backward bytes during the forward: block activations are no longer kept.
    assert b[3] < 0.35 * a[3], (b[3], a[3])
    # Deep copies keep checkpointing; disabling restores the class forward.
    twin = copy.deepcopy(ckpt)
    assert twin.decoder.mid_block.forward.args[0] is twin.decoder.mid_block
    pv.disable_gradient_checkpointing(ckpt)
    assert "forward" not in ckpt.decoder.mid_block.__dict__
    c = _run(ckpt, x, w)
    assert c[3] == a[3]



def test_offloaded_checkpointing_groupnorm_family_same_gradients():
    """AutoencoderKL (diffusers' own checkpointing, given our offloading checkpoint function): float64 gradients
    identical to the plain model's, and the step's device peak below plain checkpointing's."""
    from parallel_vae.jobs.fake_run import LiveBytes, build_model
    from parallel_vae.jobs.models import seeded_config

    torch.set_num_threads(1)
    cls_name, cfg = seeded_config("sd", width=8)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 128, 96, dtype=torch.float64) * 2 - 1  # at 48x40 the kept inputs are not at the peak
    w = torch.randn(1, 3, 128, 96, dtype=torch.float64)
    runs = []
    for opts in (None, {}, {"offload": True}):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            vae = build_model(cls_name, cfg, torch.float64)
        if opts is not None:
            pv.enable_gradient_checkpointing(vae, **opts)
        xx = x.clone().requires_grad_(True)
        with LiveBytes() as live:
            out = vae.decode(vae.encode(xx).latent_dist.mode()).sample
            (out * w).sum().backward()
        runs.append((out.detach(), xx.grad, [p.grad for p in vae.parameters()], live.peak))
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])
        assert all(torch.equal(g, h) for g, h in zip(runs[0][2], other[2]))
    assert runs[2][3] < runs[1][3] < runs[0][3], [r[3] for r in runs]
