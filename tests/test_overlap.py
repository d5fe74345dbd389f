"""The overlap of collectives with local work changes where the waits fall, never a bit of the result.

``core.comm.set_overlap`` on (the default): ``corrected_conv`` convolves its own rows while the halo rows travel,
and attention projects its queries while the keys and values travel. Off: each waits right after posting. Float64,
2 gloo ranks, uneven rows (3/2): output, input gradient and every parameter gradient, overlap on against off with
``torch.equal`` (for ``ShardedAttention`` also against its query-first order from before the overlap), and the
sharded result against the unmodified module (1e-10), for

* the three attention layers that reorder their projections: ``ShardedAttention`` on an image (AutoencoderKL's
  mid block), ``ShardedAttention(frames=T)`` (HunyuanVideo's frame-causal mid block) and HunyuanVideo-1.5's
  ``ShardedCausalFrameAttention``;
* a tiny AutoencoderKL decode with its backward (halo convs, GroupNorm, attention together).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from tests.dist_harness import run_ranks, values

SIZES = [3, 2]  # rows per rank: uneven, so the K/V gather pads and unpads


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _swap(module, mixin, group):
    from parallel_vae.core.plan import SpatialState, sharded_class

    module.__class__ = sharded_class(mixin, type(module))
    module._pv_state = SpatialState(group, dist.get_world_size(group), 1)
    return module


def _attention_modules():
    """name -> (module, mixin, input (rows at dim -2), rows dim for the module's call, call(module, x))."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import HunyuanVideo15AttnBlock

    from parallel_vae.core.attention import ShardedAttention
    from parallel_vae.families.hunyuan_video15 import ShardedCausalFrameAttention

    n, w, c, frames = sum(SIZES), 3, 4, 2

    def attn():
        return Attention(c, heads=2, dim_head=2, residual_connection=True, bias=True, processor=AttnProcessor2_0())

    def frame_call(m, x, forward=None):  # (B, C, T, h, W) -> tokens (B, T * h * W, C), as HunyuanVideo orders them
        b, ch, t, h, wd = x.shape
        sharded = isinstance(m, ShardedAttention)
        tokens = x.permute(0, 2, 3, 4, 1).flatten(1, 3)
        if forward is not None:
            out = forward(m, tokens, t)
        elif sharded:
            out = m(tokens, frames=t)
        else:
            from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import prepare_causal_attention_mask

            mask = prepare_causal_attention_mask(t, h * wd, x.dtype, x.device, batch_size=b)
            out = m(tokens, attention_mask=mask)
        return out.unflatten(1, (t, h, wd)).permute(0, 4, 1, 2, 3)

    return {
        "attention-image": (attn(), ShardedAttention, (1, c, n, w), lambda m, x: m(x)),
        "attention-frames": (attn(), ShardedAttention, (1, c, frames, n, w), frame_call),
        "hv15-causal-frame-attention": (
            HunyuanVideo15AttnBlock(c), ShardedCausalFrameAttention, (1, c, frames, n, w), lambda m, x: m(x)
        ),
    }


def _query_first(m, x, frames=None):
    """``ShardedAttention``'s forward as it was before the overlap (no group norm, as in these modules): q, k, v
    projected in that order, then the gather waited on inside ``sharded_sdpa`` / ``frame_causal_sdpa``."""
    from parallel_vae.core.attention import frame_causal_sdpa, sharded_sdpa

    group, residual = m._pv_state.group, x
    shape = x.shape
    if x.dim() == 4:
        x = x.reshape(shape[0], shape[1], -1).transpose(1, 2)  # (B, C, h_r, W) -> (B, h_r * W, C)
    b, n, _ = x.shape
    q, k, v = (t.reshape(b, n, m.heads, -1).transpose(1, 2) for t in (m.to_q(x), m.to_k(x), m.to_v(x)))
    out = sharded_sdpa(q, k, v, group) if frames is None else frame_causal_sdpa(q, k, v, frames, group)
    out = m.to_out[0](out.transpose(1, 2).reshape(b, n, -1))
    if len(shape) == 4:
        out = out.transpose(-1, -2).reshape(shape)
    return (out + residual) / m.rescale_output_factor


def _run_sharded(call, module, x_local, gout_local):
    x_local = x_local.detach().requires_grad_(True)
    out = call(module, x_local)
    grads = torch.autograd.grad(out, [x_local] + list(module.parameters()), gout_local)
    return out.detach(), grads


def _worker(rank, world):
    from parallel_vae.core import comm

    group = dist.group.WORLD
    start, rows = sum(SIZES[:rank]), SIZES[rank]
    out = {}
    for name, (module, mixin, shape, call) in _attention_modules().items():
        torch.manual_seed(0)  # the same weights and tensors on every rank
        module = module.double()
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        ref = call(module, x)
        gout = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, [x] + list(module.parameters()), gout)
        _swap(module, mixin, group)
        runs = {}
        for overlap in (True, False):
            previous = comm.set_overlap(overlap)
            try:
                runs[overlap] = _run_sharded(call, module, x.narrow(-2, start, rows), gout.narrow(-2, start, rows))
            finally:
                comm.set_overlap(previous)
        if name == "attention-image":  # and the order before the overlap (the fan-out keeps its gradient sums)
            runs["before"] = _run_sharded(
                lambda m, x: _query_first(m, x), module, x.narrow(-2, start, rows), gout.narrow(-2, start, rows)
            )
        if name == "attention-frames":
            call_before = lambda m, x: call(m, x, _query_first)  # noqa: E731
            runs["before"] = _run_sharded(call_before, module, x.narrow(-2, start, rows), gout.narrow(-2, start, rows))
        y_on, g_on = runs[True]
        bitwise = all(
            torch.equal(y_on, y) and all(torch.equal(a, b) for a, b in zip(g_on, g)) for y, g in runs.values()
        )
        # parity with the unmodified module: my rows of the output and input gradient; parameter gradients summed
        # over the group (the gradient contract), against the scale of the module's parameter gradients (the key
        # bias's gradient is zero up to rounding: softmax does not see a shift of every score by one number)
        summed = [p.clone() for p in g_on[1:]]
        for p in summed:
            dist.all_reduce(p, group=group)
        scale = max(b.abs().max() for b in ref_grads[1:])
        err = max(
            [_rel(y_on, ref.detach().narrow(-2, start, rows)), _rel(g_on[0], ref_grads[0].narrow(-2, start, rows))]
            + [((a - b).abs().max() / scale).item() for a, b in zip(summed, ref_grads[1:])]
        )
        out[name] = (bitwise, err)
    out["kl-decode"] = _kl_decode()
    return out


def _kl_decode():
    """A tiny AutoencoderKL's replicated decode and its backward, overlap on against off, bitwise."""
    import parallel_vae as pv
    from parallel_vae.core import comm
    from tests.test_compile import _tiny

    vae = pv.enable_spatial_parallelism(_tiny("kl").double())
    z = torch.randn(1, 4, sum(SIZES), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    runs = {}
    for overlap in (True, False):
        previous = comm.set_overlap(overlap)
        try:
            zz = z.clone().requires_grad_(True)
            y = vae.decode(zz).sample
            params = [zz, *vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
            grads = torch.autograd.grad((y * y.detach().sin()).sum(), params)
            runs[overlap] = (y.detach(), grads)
        finally:
            comm.set_overlap(previous)
    (y_on, g_on), (y_off, g_off) = runs[True], runs[False]
    return torch.equal(y_on, y_off) and all(torch.equal(a, b) for a, b in zip(g_on, g_off)), 0.0


@functools.lru_cache(maxsize=None)
def _results() -> dict:
    return values(run_ranks(_worker, 2))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["attention-image", "attention-frames", "hv15-causal-frame-attention", "kl-decode"])
def test_overlap_is_bitwise_equal_and_exact(name):
    for rank, res in enumerate(_results()):
        bitwise, err = res[name]
        assert bitwise, f"rank {rank}: {name} differs between overlap on and off"
        assert err <= 1e-10, f"rank {rank}: {name} is {err:.3e} from the unmodified module"
