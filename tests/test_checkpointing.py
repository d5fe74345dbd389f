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
    a, b = _run(plain, x, w), _run(ckpt, x, w)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for n in a[2]:
        assert torch.equal(a[2][n], b[2][n]), n
    # Saved-for-backward bytes during the forward: block activations are no longer kept.
    assert b[3] < 0.35 * a[3], (b[3], a[3])
    # Deep copies keep checkpointing; disabling restores the class forward.
    twin = copy.deepcopy(ckpt)
    assert twin.decoder.mid_block.forward.args[0] is twin.decoder.mid_block
    pv.disable_gradient_checkpointing(ckpt)
    assert "forward" not in ckpt.decoder.mid_block.__dict__
    c = _run(ckpt, x, w)
    assert c[3] == a[3]
