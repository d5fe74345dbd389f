"""Module plans: which module of a model becomes which row-sharded class, applied in place and undone.

A family adapter (``parallel_vae/families/*.py``) classifies every module of its diffusers class into one of
three kinds: a container (its forward only routes tensors to children), local (acts per pixel or within a row
block that shards keep together), or a treatment (its class is swapped to a sharded subclass). A module the
adapter does not know is an error, never a silent pass-through, so a diffusers release that adds a layer with
spatial reach cannot silently make results wrong.

Swapping ``__class__`` (to a subclass of the module's own class) keeps parameters, buffers, ``state_dict`` keys,
hooks and ``isinstance`` checks as they are; disabling swaps the original class back.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn

from .comm import group_rank
from .sharding import level_sizes

__all__ = [
    "SpatialState",
    "Treatment",
    "sharded_class",
    "classify",
    "apply_plan",
    "remove_plan",
    "parents_of",
    "original_class",
    "unknown_module",
]


class SpatialState:
    """What a parallelized module needs to know: its spatial process group (and the model's spatial factor).

    Deep copies share the state (an EMA copy of the model keeps working; a process group cannot be copied).
    """

    def __init__(self, group, size: int, factor: int, adapter=None):
        self.group = group
        self.size = size
        self.factor = factor
        self.adapter = adapter  # the family adapter (parallel_vae.families), read by the public API
        # The group's split in latent rows (group-rank order) of the encode/decode in progress, set by the shape
        # agreement (api._agree) before any layer runs. It is the same on every rank (every rank derives it from
        # the same gathered table), so layers that need the other ranks' row counts (the K/V gather of attention,
        # LTX's frame noise) take them from here instead of a per-layer all-gather and host read.
        self.split: Optional[tuple[int, ...]] = None
        # Per causal conv: the halo rows of the last frames of its input, remembered between the chunks of one
        # inference pass (see parallel_vae.layers.causal_cache_conv). Weak keys: a module that is gone takes its rows with it.
        self.tails: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

    def level_sizes(self, rows: int, dim_name: str = "rows") -> Optional[list[int]]:
        """Every rank's rows at a level where this rank holds ``rows`` (the agreed split scaled to the level), or
        ``None`` when no agreement has run (a layer driven directly, outside the public API: the caller then
        gathers the sizes itself). The split stays valid for the backward (and checkpoint recompute) of the
        graph that the most recent encode/decode built."""
        if self.split is None or self.size == 1:
            return None
        return level_sizes(self.split, rows, group_rank(self.group))

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"SpatialState(size={self.size}, factor={self.factor})"


@dataclass(frozen=True)
class Treatment:
    """One entry of a plan: the module at ``name`` becomes an instance of ``cls``; ``reason`` says why."""

    name: str
    cls: type
    reason: str


_SUBCLASSES: dict[tuple[type, type], type] = {}


def sharded_class(mixin: type, base: type) -> type:
    """The subclass ``(mixin, base)``: ``mixin`` supplies the row-sharded ``forward`` for a diffusers class it was
    written for (e.g. one causal-conv mixin serves ``WanCausalConv3d`` and ``QwenImageCausalConv3d``).

    Created once per pair and registered in this module under its name, so pickling a parallel model finds it."""
    if issubclass(base, mixin):
        return base
    key = (mixin, base)
    cls = _SUBCLASSES.get(key)
    if cls is None:
        name = f"{mixin.__name__}_{base.__name__}"
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name})
        setattr(sys.modules[__name__], name, cls)
        _SUBCLASSES[key] = cls
    return cls


def parents_of(model: nn.Module) -> dict[int, nn.Module]:
    """id(child) -> parent for every module of ``model``."""
    return {id(c): p for p in model.modules() for c in p.children()}


def original_class(m: nn.Module) -> type:
    """The class a module had before any plan was applied to it."""
    return m.__dict__.get("_pv_original_class", type(m))


def unknown_module(name: str, m: nn.Module, why: str = "") -> NotImplementedError:
    extra = f": {why}" if why else ""
    text = repr(m) if len(list(m.children())) == 0 else type(m).__name__
    return NotImplementedError(f"parallel_vae does not know how to shard {name} ({text}){extra}")


def classify(
    model: nn.Module,
    containers: tuple,
    local: tuple,
    treat: Callable[[str, nn.Module, dict], Optional[Treatment]],
) -> list[Treatment]:
    """Walk every module of ``model``: containers and local classes (exact types: a subclass may override forward
    with spatial reach we have not read) need nothing; everything else goes to ``treat(name, module, parents)``
    (``parents``: id(module) -> parent module), which returns a Treatment, ``None`` (checked and local) or raises."""
    parents = parents_of(model)
    plan = []
    for name, m in model.named_modules():
        cls = original_class(m)
        if m is model or cls in containers or cls in local:
            continue
        t = treat(name, m, parents)
        if t is not None:
            plan.append(t)
    return plan


def apply_plan(model: nn.Module, plan: list[Treatment], state: SpatialState) -> None:
    """Swap every planned module to its sharded class, in place (parameters and keys unchanged)."""
    modules = dict(model.named_modules())
    for t in plan:
        m = modules[t.name]
        if "_pv_original_class" not in m.__dict__:
            m._pv_original_class = type(m)
        m.__class__ = t.cls
        m._pv_state = state


def remove_plan(model: nn.Module) -> None:
    """Restore every swapped module's original class."""
    for m in model.modules():
        original = m.__dict__.pop("_pv_original_class", None)
        if original is not None:
            m.__class__ = original
            m.__dict__.pop("_pv_state", None)
