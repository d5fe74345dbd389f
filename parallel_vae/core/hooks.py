"""Forward-wrapping hooks (diffusers' ``HookRegistry``, accelerate's ``add_hook_to_module``) on swapped modules.

The problem. A plan swaps a module's ``__class__`` to a row-sharded subclass (:mod:`.plan`). Python resolves
``module.forward`` through the class, so a swap changes what every later call runs -- unless something stored the
*bound* ``forward`` of the old class. That is exactly what forward-wrapping hooks do:

* diffusers (``enable_layerwise_casting``, ``enable_group_offload``, the cache hooks): ``HookRegistry.register_hook``
  stores ``module.forward`` (a bound method of the class at that time) in a ``HookFunctionReference`` and sets the
  instance attribute ``module.forward`` to a wrapper that calls ``pre_forward``, the stored forward, ``post_forward``.
  A hook with ``new_forward`` stores the old forward as ``original_forward`` and calls that.
* accelerate (``add_hook_to_module``: ``cpu_offload``, ``dispatch_model``, ``AlignDevicesHook``, any ``ModelHook``):
  stores ``module._old_forward = module.forward`` and sets ``module.forward`` to a wrapper that calls it.

A hook registered before enabling therefore keeps calling the unsharded forward on shards (the measured defect: an
AutoencoderKL with layerwise casting, 2 ranks, 0.97 relative error in float32). One registered while enabled stores
the sharded forward and would keep calling it after disabling, on a module with no spatial state.

The mechanism, and why. Each wrapper chain ends in one stored bound forward of the module itself (the "base"). We
re-point that base: on enabling, from the original class's forward to the sharded class's forward (the chain's
wrappers, their order and their state are untouched); on disabling, back -- to the very object stored before
enabling where there was one, else to a fresh bound forward of the original class, which is what the hook would
have stored on the unmodified model. The class swap stays the single source of what a module computes.

We did not move the sharded forwards into ``HookRegistry`` hooks (diffusers' own context parallelism does that):

* a ``new_forward`` hook replaces the forward of the hooks registered before it, so ours would have to be the
  innermost, and the registry only appends -- a model that already carries layerwise casting would run our forward
  in place of the cast, on fp8 weights;
* accelerate's hooks are not in that registry, so they would still need this re-pointing;
* the plan's contract (``state_dict`` keys, ``isinstance``, pickling by class) comes from the class swap, which a
  hook would not replace but duplicate.

What is refused, naming the hook (``HookError``, before anything is changed):

* a diffusers hook that replaces a forward (``new_forward``: the cache hooks FirstBlockCache, MagCache, FasterCache,
  PyramidAttentionBroadcast, TaylorSeer, SEA cache, LayerSkip, text KV cache) anywhere in the model. Such a hook
  decides whether to run the module, and its decisions come from this rank's rows (FirstBlockCache compares a
  residual of the block's output): ranks that decide differently run different collectives and hang. Only
  ``PeftInputAutocastDisableHook``, which always calls the forward, is let through.
* diffusers' own context-parallel hooks: they split the same module's tensors a second time.
* a forward wrapper of unknown kind on a swapped module (``module.forward = something`` by other code): we cannot
  see what it calls, so we cannot make it call the sharded forward.

Encode/decode calls re-check (``verify``): a hook added while enabled must end in the sharded forward (it does, if
it is of a kind above: it stored ``module.forward`` after the swap) and must not be of a refused kind. Torch's own
``register_forward_hook`` / ``register_forward_pre_hook`` run inside ``Module.__call__`` around whatever
``forward`` resolves to, so they compose with the swap unchanged and are not touched here.
"""

from __future__ import annotations

import functools
import types
from typing import Iterator, Optional

import torch
import torch.nn as nn

__all__ = ["HookError", "check_hooks", "follow_class", "restore_hooks", "verify"]

_SAVED = "_pv_hooked_forwards"  # per swapped module: [(holder, attribute, the object stored there before enabling)]


class HookError(RuntimeError):
    """A hook on the model that spatial parallelism cannot compose with; the message names it and the module."""


# --------------------------------------------------------------------------------------------------------------
# reading the chains
# --------------------------------------------------------------------------------------------------------------


def _diffusers_ref(f, m: nn.Module):
    """The ``HookFunctionReference`` behind a diffusers wrapper ``f`` of ``m`` (None if ``f`` is not one)."""
    func = getattr(f, "func", None)
    if not isinstance(f, functools.partial) or not f.args or f.args[0] is not m:
        return None
    if getattr(func, "__module__", None) != "diffusers.hooks.hooks" or getattr(func, "__name__", None) != "new_forward":
        return None
    cells = dict(zip(func.__code__.co_freevars, func.__closure__ or ()))
    cell = cells.get("function_reference")
    return None if cell is None else cell.cell_contents


def _is_accelerate_wrapper(f, m: nn.Module) -> bool:
    func = getattr(f, "func", None)
    return (
        isinstance(f, functools.partial)
        and bool(f.args)
        and f.args[0] is m
        and getattr(func, "__module__", None) == "accelerate.hooks"
        and getattr(func, "__name__", None) == "new_forward"
        and "_old_forward" in m.__dict__
    )


def _diffusers_hook_of(m: nn.Module, ref) -> tuple[str, object]:
    registry = m.__dict__.get("_diffusers_hook")
    for name, hook in getattr(registry, "hooks", {}).items():
        if getattr(hook, "fn_ref", None) is ref:
            return name, hook
    return "?", None


def _accelerate_name(m: nn.Module) -> str:
    hook = m.__dict__.get("_hf_hook")
    inner = getattr(hook, "hooks", None)  # SequentialHook
    if inner is not None:
        return "accelerate SequentialHook(" + ", ".join(type(h).__name__ for h in inner) + ")"
    return f"accelerate {type(hook).__name__}"


def _describe(f) -> str:
    func = getattr(f, "func", f)
    name = getattr(func, "__qualname__", None) or type(f).__name__
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module else name


def _class_forwards(m: nn.Module) -> set:
    """The functions a base may be bound to: the original class's forward and the sharded class's."""
    original = m.__dict__.get("_pv_original_class", type(m))
    return {getattr(original, "forward", None), getattr(type(m), "forward", None)}


def _bases(m: nn.Module, label: str, forwards: Optional[set] = None) -> list[tuple[object, str]]:
    """The (holder, attribute) slots where ``m``'s forward chain stores a bound class forward of ``m``.

    Walks from the instance attribute ``forward`` through diffusers and accelerate wrappers, in whatever order they
    were stacked. Raises ``HookError`` for a wrapper we cannot follow."""
    forwards = _class_forwards(m) if forwards is None else forwards
    slots = []
    holder, attr = m, "forward"
    f = m.__dict__.get("forward")
    if f is None:
        return slots  # no instance forward: the class's own runs
    for _ in range(10_000):  # a chain is a few links; the bound only guards against a cycle
        if isinstance(f, types.MethodType) and f.__self__ is m and f.__func__ in forwards:
            slots.append((holder, attr))
            return slots
        ref = _diffusers_ref(f, m)
        if ref is not None:
            if ref.original_forward is not None:  # a hook with new_forward: it calls original_forward
                holder, attr = ref, "original_forward"
            else:
                holder, attr = ref, "forward"
        elif _is_accelerate_wrapper(f, m):
            holder, attr = m, "_old_forward"
        else:
            raise HookError(
                f"{label} ({type(m).__name__}) has a forward wrapper parallel_vae cannot follow: {_describe(f)}. "
                "Only diffusers hooks (HookRegistry) and accelerate hooks (add_hook_to_module) are recognized; remove "
                "the wrapper before enable_spatial_parallelism"
            )
        f = getattr(holder, attr)
    raise HookError(f"{label}: its forward wrappers form a cycle")


def _refused(model: nn.Module) -> Iterator[str]:
    """Descriptions of the hooks in ``model`` that cannot compose with spatial parallelism (module docstring)."""
    try:
        from diffusers.hooks.context_parallel import ContextParallelGatherHook, ContextParallelSplitHook
        from diffusers.hooks.layerwise_casting import PeftInputAutocastDisableHook
    except ImportError:  # a diffusers without these modules has none of these hooks either
        ContextParallelGatherHook = ContextParallelSplitHook = PeftInputAutocastDisableHook = ()  # noqa: N806
    for label, m in model.named_modules():
        registry = m.__dict__.get("_diffusers_hook")
        for name, hook in getattr(registry, "hooks", {}).items():
            where = f"diffusers hook {name!r} ({type(hook).__name__}) on {label or 'the model'}"
            if isinstance(hook, (ContextParallelSplitHook, ContextParallelGatherHook)):
                yield f"{where}: diffusers' context parallelism splits this module's tensors too, and two splittings of one tensor do not compose"
            elif hasattr(hook, "new_forward") and not isinstance(hook, PeftInputAutocastDisableHook):
                yield (
                    f"{where} replaces the module's forward and decides on its own whether to run it; on row shards "
                    "each rank decides from its own rows, and ranks that decide differently run different "
                    "collectives (a hang). Remove it (registry.remove_hook(name)) or apply it outside the VAE"
                )


def _swapped(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for label, m in model.named_modules():
        if "_pv_original_class" in m.__dict__:
            yield label, m


# --------------------------------------------------------------------------------------------------------------
# enable / disable / each call
# --------------------------------------------------------------------------------------------------------------


def check_hooks(model: nn.Module, plan) -> None:
    """Before a plan is applied: raise ``HookError`` for a hook that cannot compose (module docstring), or a
    forward wrapper of a module to be swapped that cannot be followed. Changes nothing."""
    problems = list(_refused(model))
    if problems:
        raise HookError("spatial parallelism cannot compose with " + "; ".join(problems))
    modules = dict(model.named_modules())
    for t in plan:
        _bases(modules[t.name], t.name)


def follow_class(model: nn.Module) -> None:
    """After the swap: every swapped module's hook chains end in its (new) class's forward. What each slot held is
    kept on the module for :func:`restore_hooks`."""
    for label, m in _swapped(model):
        sharded = type(m).forward
        if m.__dict__["_pv_original_class"].forward is sharded:
            continue  # the mixin keeps the class's forward (it overrides something the forward calls)
        saved = []
        for holder, attr in _bases(m, label):
            old = getattr(holder, attr)
            if old.__func__ is not sharded:
                saved.append((holder, attr, old))
                setattr(holder, attr, types.MethodType(sharded, m))
        if saved:
            m.__dict__[_SAVED] = saved


def restore_hooks(model: nn.Module) -> None:
    """Before the original classes are swapped back: every swapped module's chains (those stacked before enabling
    and those added since) end in the original class's forward again. A slot that held a forward before enabling
    gets that object back. Checks every module before changing any, so a refusal leaves the model enabled."""
    work = [(m, _bases(m, label)) for label, m in _swapped(model)]
    for m, slots in work:
        original = m.__dict__["_pv_original_class"].forward
        saved = {(id(h), a): old for h, a, old in m.__dict__.pop(_SAVED, [])}
        for holder, attr in slots:
            if getattr(holder, attr).__func__ is original:
                continue
            old = saved.get((id(holder), attr))
            setattr(holder, attr, old if old is not None else types.MethodType(original, m))


def verify(model: nn.Module) -> None:
    """At each encode/decode: no refused hook was added, and every swapped module's chain ends in its sharded
    forward (a hook stacked while enabled stored the sharded forward; anything else would bypass it)."""
    problems = list(_refused(model))
    if problems:
        raise HookError("spatial parallelism cannot compose with " + "; ".join(problems))
    for label, m in _swapped(model):
        sharded = type(m).forward
        for holder, attr in _bases(m, label):
            if getattr(holder, attr).__func__ is not sharded:
                raise HookError(
                    f"{label} ({type(m).__name__}): a forward wrapper added while spatial parallelism was enabled "
                    f"stores the unsharded forward ({_describe(getattr(holder, attr))}), so it would bypass the "
                    "sharded one; remove it, or disable spatial parallelism, add it, and enable again"
                )


def execution_device(model: nn.Module) -> Optional[torch.device]:
    """Where the model's activations live when offloading hooks keep its weights elsewhere, else ``None``.

    accelerate's ``cpu_offload`` leaves the weights on ``meta`` and its ``AlignDevicesHook`` names the
    ``execution_device``; diffusers' group offloading keeps them on the offload device and its hook's group names the
    ``onload_device``. The agreement and every collective run there, not where the parameters happen to sit."""
    for m in model.modules():
        hook = m.__dict__.get("_hf_hook")
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
        registry = m.__dict__.get("_diffusers_hook")
        for h in getattr(registry, "hooks", {}).values():
            dev = getattr(getattr(h, "group", None), "onload_device", None)
            if dev is not None:
                return torch.device(dev)
    return None
