"""LPIPS (VGG16 trunk) in the taming / LPIPS key layout, whole-frame and on row shards.

Why at package level, beside :mod:`.loss`: this is a training loss built from core machinery (halo convs, the
row-split walk of :mod:`.core.rowwise`), not family-agnostic machinery itself (``core/``), not a layer written for
one diffusers class (``layers/``), not a family adapter (``families/``) and not a job (``jobs/``).

:class:`LPIPS` is the network of ``taming/modules/losses/lpips.py`` (and of richzhang's ``lpips`` package, net
'vgg', version 0.1): a fixed scaling of the input, VGG16's ``features`` cut after relu1_2, relu2_2, relu3_3, relu4_3
and relu5_3 (``net.slice1`` .. ``net.slice5``, keeping torchvision's layer indices), per-pixel unit normalization of
each feature over channels, squared differences, a learned 1x1 conv per level (``lin0`` .. ``lin4``, behind a
dropout: ``lin0.model.1.weight``) and the spatial mean, summed over the five levels. Its plain ``forward`` is the
whole-frame reference.

:func:`lpips_rows` runs the same network on this rank's rows: the convs take halos, the 2x2 pools realign rows where
a shard boundary falls on an odd row of their level (VGG pools 16x; see :mod:`.core.rowwise`), the normalization and
1x1 convs are per pixel, and each level's spatial mean becomes this rank's sum divided by the whole level's H x W.
Summed over the group, the per-rank values are the whole-frame LPIPS; their gradients are its gradients.

Weights come from files the user supplies (:func:`load_lpips`); nothing downloads. The trunk's widths are read from
the weights, so a test can save a seeded, narrow network and load it back.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence, Union

import torch
import torch.nn as nn

from .core.rowwise import RowSplit, check_layers, row_split_of, run_layers
from .errors import InputError

__all__ = ["LPIPS", "VGG16_CHANNELS", "lpips_rows", "check_lpips_rows", "load_lpips", "read_state_dict", "seeded_lpips"]

VGG16_CHANNELS = (64, 128, 256, 512, 512)
# VGG16 "D" features: convs per level, each followed by ReLU; a 2x2/2 max-pool between levels.
_CONVS_PER_LEVEL = (2, 2, 3, 3, 3)


class ScalingLayer(nn.Module):
    """LPIPS's input scaling: ``(x - shift) / scale`` per channel (inputs in [-1, 1])."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """A learned 1x1 conv to one channel, behind a dropout (``model.0``) as in the released weights' layout."""

    def __init__(self, chn_in: int, chn_out: int = 1, use_dropout: bool = True):
        super().__init__()
        layers = [nn.Dropout()] if use_dropout else []
        layers += [nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False)]
        self.model = nn.Sequential(*layers)


class VGG16Trunk(nn.Module):
    """torchvision's ``vgg16().features`` cut into five slices, module names kept (``slice2.5`` is ``features.5``)."""

    def __init__(self, channels: Sequence[int] = VGG16_CHANNELS):
        super().__init__()
        layers, c_in = [], 3
        for level, (c, n) in enumerate(zip(channels, _CONVS_PER_LEVEL)):
            if level:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            for _ in range(n):
                layers += [nn.Conv2d(c_in, c, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c_in = c
        cuts = (0, 4, 9, 16, 23, 30)
        for k in range(5):
            s = nn.Sequential()
            for i in range(cuts[k], cuts[k + 1]):
                s.add_module(str(i), layers[i])
            setattr(self, f"slice{k + 1}", s)

    def slices(self) -> list[nn.Sequential]:
        return [getattr(self, f"slice{k + 1}") for k in range(5)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for s in self.slices():
            x = s(x)
            out.append(x)
        return out


def normalize_tensor(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit length over channels, per pixel (LPIPS's ``normalize_tensor``)."""
    norm_factor = torch.sqrt(torch.sum(x**2, dim=1, keepdim=True))
    return x / (norm_factor + eps)


class LPIPS(nn.Module):
    """The LPIPS perceptual distance with a VGG16 trunk (taming's ``LPIPS``); frozen and in eval mode.

    ``forward(input, target)`` -> (B, 1, 1, 1), the whole-frame reference. Inputs are images in [-1, 1]."""

    def __init__(self, channels: Sequence[int] = VGG16_CHANNELS, use_dropout: bool = True):
        super().__init__()
        self.channels = tuple(channels)
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Trunk(channels)
        for k, c in enumerate(channels):
            setattr(self, f"lin{k}", NetLinLayer(c, use_dropout=use_dropout))
        self.requires_grad_(False)
        self.eval()

    def lins(self) -> list[NetLinLayer]:
        return [getattr(self, f"lin{k}") for k in range(len(self.channels))]

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        outs0, outs1 = self.net(self.scaling_layer(input)), self.net(self.scaling_layer(target))
        val = 0
        for lin, f0, f1 in zip(self.lins(), outs0, outs1):
            diff = (normalize_tensor(f0) - normalize_tensor(f1)) ** 2
            val = val + lin.model(diff).mean([2, 3], keepdim=True)
        return val


def _trunk_rows(lpips: LPIPS, x: torch.Tensor, group) -> list[tuple[torch.Tensor, int]]:
    """This rank's rows of the five feature maps, each with its level's whole height."""
    x = lpips.scaling_layer(x)
    split = row_split_of(x, group)
    out = []
    for k, s in enumerate(lpips.net.slices()):
        x, split = run_layers([(f"LPIPS net.slice{k + 1}.{n}", m) for n, m in s.named_children()], x, split, group)
        out.append((x, split.total))
    return out


def check_lpips_rows(lpips: LPIPS, sizes) -> None:
    """Raise the :class:`~parallel_vae.core.sharding.ShardingError` :func:`lpips_rows` would raise for images split
    in ``sizes`` rows per rank, without running anything."""
    split = RowSplit(tuple(sum(sizes[:r]) for r in range(len(sizes) + 1)))
    for k, s in enumerate(lpips.net.slices()):
        split = check_layers([(f"LPIPS net.slice{k + 1}.{n}", m) for n, m in s.named_children()], split)


def lpips_rows(lpips: LPIPS, input_local: torch.Tensor, target_local: torch.Tensor, group=None) -> torch.Tensor:
    """forward: this rank's part of LPIPS(input, target) per sample, (B,), for images (B, 3, H, W) whose rows are
    split over ``group``: summed over the group it is ``lpips(input, target).flatten()``; backward: the exact
    input gradient (halo gradients return to their owners).

    The target's features are computed without autograd (it is the real image). Every rank must call this at the
    same time (one small all-gather of the row counts, then halo exchanges)."""
    if input_local.shape != target_local.shape or input_local.dim() != 4:
        raise ValueError(f"lpips_rows needs two (B, 3, H, W) tensors of one shape, got {tuple(input_local.shape)} and "
                         f"{tuple(target_local.shape)}")  # fmt: skip
    feats0 = _trunk_rows(lpips, input_local, group)
    with torch.no_grad():
        feats1 = _trunk_rows(lpips, target_local, group)
    val = 0
    for lin, (f0, rows), (f1, _) in zip(lpips.lins(), feats0, feats1):
        diff = (normalize_tensor(f0) - normalize_tensor(f1)) ** 2
        # the level's spatial mean: my rows' sum over the whole level's H x W
        val = val + lin.model(diff).sum([1, 2, 3]) / (rows * f0.shape[-1])
    return val


# ---------------------------------------------------------------------------------------------------------------
# Weights from files (no downloads)
# ---------------------------------------------------------------------------------------------------------------


def read_state_dict(path: str) -> dict:
    """A state dict from a safetensors file or a ``torch.save`` file (tensors only: ``weights_only=True``); a
    checkpoint that wraps it (``{"state_dict": ...}``, Lightning's and taming's layout) is unwrapped."""
    if not os.path.isfile(path):
        raise InputError(f"weights file {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"weights file {path} cannot be read ({type(e).__name__}: {e})") from e
    while isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"weights file {path} does not hold a state dict of tensors")
    return sd


def _strip(sd: dict, marker: str) -> dict:
    """Keys below ``marker`` (e.g. ``loss.perceptual_loss.net.slice1.0.weight`` -> ``net.slice1.0.weight``) when
    the file is a whole-model checkpoint; unchanged otherwise."""
    if any(marker in k for k in sd):
        return {k.split(marker, 1)[1]: v for k, v in sd.items() if marker in k}
    return sd


def _lpips_keys(sd: dict) -> dict:
    """LPIPS/taming keys from any of the accepted layouts: the LPIPS module's own (``net.sliceK.N.*``,
    ``linK.model.1.weight``), torchvision's VGG16 (``features.N.*``; ``classifier.*`` dropped) and lin layers without
    the dropout (``linK.model.0.weight``)."""
    sd = _strip(sd, "perceptual_loss.")
    cuts = (0, 4, 9, 16, 23, 30)
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "classifier":
            continue
        if parts[0] == "features" and len(parts) == 3:
            i = int(parts[1])
            level = max(j for j in range(5) if cuts[j] <= i)
            k = f"net.slice{level + 1}.{i}.{parts[2]}"
        elif parts[0].startswith("lin") and parts[1:3] == ["model", "0"] and v.dim() == 4:
            k = f"{parts[0]}.model.1.{parts[3]}"
        out[k] = v
    return out


def load_lpips(paths: Union[str, Iterable[str]], dtype: torch.dtype = torch.float32, device=None) -> LPIPS:
    """An :class:`LPIPS` from one or more weight files whose keys together cover the network: e.g. a full LPIPS
    state dict, or torchvision's ``vgg16`` file plus LPIPS's ``vgg.pth`` (lin layers only). The trunk's widths are
    read from the weights. A missing or unexpected key is an :class:`~parallel_vae.errors.InputError`."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    sd = {}
    for p in paths:
        sd.update(_lpips_keys(read_state_dict(p)))
    try:
        channels = []
        for k in range(5):
            convs = sorted((int(n.split(".")[2]), v) for n, v in sd.items()
                           if n.startswith(f"net.slice{k + 1}.") and n.endswith(".weight"))  # fmt: skip
            channels.append(convs[-1][1].shape[0])
    except IndexError:
        raise InputError(f"{', '.join(paths)}: no VGG16 trunk weights (net.sliceK.N.weight or features.N.weight)")
    model = LPIPS(channels)
    own = model.state_dict()
    sd.setdefault("scaling_layer.shift", own["scaling_layer.shift"])
    sd.setdefault("scaling_layer.scale", own["scaling_layer.scale"])
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise InputError(
            f"{', '.join(paths)}: not an LPIPS VGG16 network"
            + (f"; missing {missing[:6]}{' ...' if len(missing) > 6 else ''}" if missing else "")
            + (f"; unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}" if unexpected else "")
        )
    bad = [k for k in own if own[k].shape != sd[k].shape]
    if bad:
        raise InputError(f"{', '.join(paths)}: shapes do not fit an LPIPS VGG16 network at {bad[:4]}")
    model.load_state_dict(sd)
    return model.to(device=device, dtype=dtype)


def seeded_lpips(channels: Sequence[int] = VGG16_CHANNELS, seed: int = 0, dtype=torch.float32) -> LPIPS:
    """A seeded LPIPS for tests (no real weights): He-normal convs as torchvision initializes VGG, small positive
    biases (so that few pixels have all channels at zero after a ReLU, where LPIPS's normalization has no
    gradient), and positive lin weights as the released ones are."""
    model = LPIPS(channels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 + 0.05 * torch.rand(m.bias.shape, generator=g))
                if m.out_channels == 1 and m.kernel_size == (1, 1):
                    m.weight.abs_()
    return model.to(dtype)
