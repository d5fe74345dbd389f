"""Loading what recipes need: the VAE (built-in default, diffusers folder or hub id, single-file checkpoint) and
latent tensors (.safetensors / .pt / .npy / .npz), with every failure raised as one clear :class:`InputError`.

Model sources, in the order :func:`load_vae` considers them:

Any supported family loads (``parallel_vae.families.FAMILIES``): the diffusers class comes from the config's
``_class_name``, so no family flag is needed where there is a config.

* ``single_file``: a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.ckpt`` state dict. Any family with ``config``
  naming its diffusers config (the class's own ``from_single_file`` converts original key names); for Wan also
  without a config, either in the original Wan
  format (``Wan2.1_VAE.pth``: ``encoder.conv1.weight``, ``decoder.upsamples.*``, ...) or in diffusers' own key
  names. It is loaded with ``AutoencoderKLWan.from_single_file``. That function needs a diffusers config; without
  one it infers the checkpoint type and downloads the matching config from the hub, which fails offline. So unless
  ``config`` names one, the config is inferred here from the weight shapes (layout, widths) and handed to
  ``from_single_file`` as a local folder: loading a single file never needs the hub.
* ``pretrained``: a local diffusers folder (``save_pretrained`` output) or a hub id. A pipeline repository keeps
  the VAE in ``vae/``; for local folders the subfolder is detected (``config.json`` at the top or under ``vae/``),
  for hub ids ``vae/`` is tried first, then the top level.
* the default: ``parallel_vae/assets/default_vae/`` (a small trained checkpoint) if that folder exists, else a
  seeded model of the real Wan2.1 layout at a small width (:func:`parallel_vae.jobs.models.build_wan_vae`).

The fine-tuning recipe uses the same functions, so both recipes agree on what "the default model" is.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.utils import logging as diffusers_logging

from ..errors import InputError
from .cli import UsageError
from ..families import FAMILIES, adapter_for, latent_channels, spatial_factor
from .models import build_wan_vae, seeded_config, wan_config

__all__ = [
    "DEFAULT_VAE_DIR",
    "DEFAULT_SEEDED",
    "DTYPES",
    "parse_dtype",
    "load_vae",
    "default_vae",
    "load_pretrained",
    "load_single_file",
    "read_state_dict",
    "infer_wan_config",
    "load_latents",
    "parse_seeded",
    "vae_class",
    "denormalize_latents",
    "normalize_latents",
    "describe_vae",
]

# Where the small trained checkpoint of the fine-tuning recipe goes (a diffusers save_pretrained folder).
DEFAULT_VAE_DIR = Path(__file__).resolve().parents[1] / "assets" / "default_vae"
# The seeded fallback: the real Wan2.1 layout and latent width (z_dim 16, so real Wan2.1 latents' channel count and
# latents_mean/std apply), at a channel width that decodes a short clip in seconds on one CPU core.
DEFAULT_SEEDED = dict(layout="wan2.1", base_dim=32, z_dim=16, seed=0)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_STATE_DICT_EXTS = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
_LATENT_EXTS = (".safetensors", ".pt", ".pth", ".bin", ".npy", ".npz")
# Keys a pipeline or a user is likely to store latents under, in order of preference.
_LATENT_KEYS = ("latents", "latent", "frames", "z", "samples")
# A hub id is "name" or "org/name"; anything else that does not exist locally is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def parse_dtype(name: str) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` -> the torch dtype; anything else is an :class:`InputError`."""
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# --------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------


def load_vae(
    *,
    pretrained: Optional[str] = None,
    subfolder: Optional[str] = None,
    single_file: Optional[str] = None,
    config: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    default_dir: os.PathLike | str = DEFAULT_VAE_DIR,
) -> tuple[AutoencoderKLWan, dict]:
    """Load the VAE a recipe was asked for; returns ``(vae in eval mode, description of its source)``.

    Arguments:
        pretrained: local diffusers folder or hub id (see the module docstring).
        subfolder: the folder inside ``pretrained`` (or inside ``config`` for a single file) holding the VAE's
            ``config.json``; ``None`` detects it.
        single_file: path of a single-file checkpoint (original Wan or diffusers key names).
        config: for ``single_file`` only: a diffusers folder or hub id with the VAE config; ``None`` infers it.
        dtype: parameter dtype.
        default_dir: the default checkpoint folder, used when neither ``pretrained`` nor ``single_file`` is given.

    Raises:
        InputError: both sources given, a missing or unreadable file or folder, a checkpoint that is not a Wan VAE.
    """
    if pretrained and single_file:
        raise InputError("give either --pretrained or --single_file, not both")
    if config and not single_file:
        raise InputError("--config only applies to --single_file (a --pretrained folder has its own config.json)")
    if single_file:
        return load_single_file(single_file, config=config, subfolder=subfolder, dtype=dtype)
    if pretrained:
        return load_pretrained(pretrained, subfolder=subfolder, dtype=dtype)
    if subfolder:
        raise InputError("--subfolder needs --pretrained (or --single_file with --config)")
    return default_vae(dtype=dtype, default_dir=default_dir)


def default_vae(
    dtype: torch.dtype = torch.float32, default_dir: os.PathLike | str = DEFAULT_VAE_DIR
) -> tuple[AutoencoderKLWan, dict]:
    """The built-in model, in eval mode: the checkpoint in ``default_dir`` if it exists, else the seeded
    Wan2.1-layout model (:data:`DEFAULT_SEEDED`).

    The package ships that checkpoint (a small VAE the fine-tuning recipe trained on its synthetic data;
    docs/recipes.md, "The embedded default checkpoint"). Should the packaged folder be missing (an install without
    package data), the untrained seeded model decodes noise-like colour, so that fallback warns."""
    default_dir = Path(default_dir)
    if default_dir.is_dir():
        vae, source = load_pretrained(str(default_dir), dtype=dtype)
        source["kind"] = "default_checkpoint"
        return vae, source
    if default_dir.resolve() == DEFAULT_VAE_DIR.resolve():
        warnings.warn(
            f"the embedded default checkpoint {DEFAULT_VAE_DIR} is missing (installed without package data?); "
            "using an untrained seeded model, whose decodes are not meaningful",
            stacklevel=2,
        )
    vae = build_wan_vae(
        DEFAULT_SEEDED["layout"],
        base_dim=DEFAULT_SEEDED["base_dim"],
        z_dim=DEFAULT_SEEDED["z_dim"],
        seed=DEFAULT_SEEDED["seed"],
        dtype=dtype,
    )
    return vae, {"kind": "default_seeded", **DEFAULT_SEEDED}


def _is_local(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path))


def _local_subfolder(folder: Path, subfolder: Optional[str]) -> str:
    """The subfolder of a local diffusers folder that holds the VAE's config.json ("" for the top level)."""
    if subfolder is not None:
        if not (folder / subfolder / "config.json").is_file():
            raise InputError(f"no config.json in {folder / subfolder} (from --subfolder {subfolder!r})")
        return subfolder
    if (folder / "config.json").is_file():
        return ""
    if (folder / "vae" / "config.json").is_file():
        return "vae"  # a pipeline folder: model_index.json at the top, the VAE in vae/
    raise InputError(
        f"{folder} is not a diffusers model folder: no config.json at its top or in vae/ "
        "(pass --subfolder if the VAE is elsewhere, or --single_file for a checkpoint file)"
    )


def vae_class(class_name: Optional[str]) -> type:
    """The diffusers class of a supported family from a config's ``_class_name``; an InputError for any other."""
    import diffusers

    supported = {a.model_class.__name__: a.model_class for a in FAMILIES.values()}
    if class_name not in supported:
        raise InputError(
            f"the config's _class_name is {class_name!r}; parallel_vae supports {', '.join(sorted(supported))}"
        )
    return getattr(diffusers, class_name)


def _config_class(path: str, subfolder: Optional[str], **kwargs) -> type:
    cfg = AutoencoderKLWan.load_config(path, subfolder=subfolder or None, **kwargs)  # any config.json, any class
    return vae_class(cfg.get("_class_name"))


def _from_pretrained(path: str, subfolder: str, dtype: torch.dtype, **kwargs):
    with _quiet_diffusers():
        cls = _config_class(path, subfolder, **kwargs)
        return cls.from_pretrained(path, subfolder=subfolder or None, torch_dtype=dtype, **kwargs)


def parse_seeded(spec: str) -> dict:
    """``LAYOUT[:WIDTH[:LATENT]]`` (``--seeded``, both recipes) -> keyword arguments of :func:`build_seeded_vae`.

    The syntax and the default width are :func:`parallel_vae.jobs.cli.parse_seeded_spec`'s (torch-free, checked
    before a launch's heavy imports); here the layout's config is also built, so a width it cannot take is refused
    before any weights are made."""
    from .cli import parse_seeded_spec

    layout, width, latent = parse_seeded_spec(spec)
    out = {"layout": layout, "width": width}
    if latent is not None:
        out["latent"] = latent
    try:
        seeded_config(layout, width, latent)
    except ValueError as e:
        raise UsageError(f"--seeded {spec!r}: {e}") from None
    return out


def load_pretrained(
    path_or_id: str, subfolder: Optional[str] = None, dtype: torch.dtype = torch.float32
) -> tuple[AutoencoderKLWan, dict]:
    """``AutoencoderKLWan.from_pretrained`` of a local folder or a hub id, with the VAE's subfolder detected."""
    if _is_local(path_or_id):
        folder = Path(os.path.expanduser(path_or_id))
        if not folder.is_dir():
            raise InputError(f"--pretrained {path_or_id} is a file, not a diffusers folder (use --single_file)")
        sub = _local_subfolder(folder, subfolder)
        try:
            vae = _from_pretrained(str(folder), sub, dtype, local_files_only=True)
        except InputError:
            raise
        except Exception as e:  # diffusers raises OSError, ValueError, RuntimeError (shapes), safetensors errors
            raise InputError(f"cannot load the VAE from {folder / sub}: {e}") from e
        return _ready(vae, dtype), {"kind": "pretrained", "path": str(folder), "subfolder": sub}
    if not _HUB_ID.match(path_or_id):
        raise InputError(f"--pretrained {path_or_id}: no such folder (and it is not a hub id like org/name)")
    tries = [subfolder] if subfolder is not None else ["vae", ""]
    # Without a network huggingface_hub retries for about a minute on every rank and then reports a missing
    # config.json: decide up front, and use only the local cache when the hub cannot be reached.
    offline = _hub_offline()
    unreachable = None if offline else _hub_unreachable()
    if offline or unreachable:
        for sub in tries:
            try:
                vae = _from_pretrained(path_or_id, sub, dtype, local_files_only=True)
            except InputError:
                raise
            except Exception:
                continue
            source = {"kind": "pretrained", "path": path_or_id, "subfolder": sub, "hub": True, "cached": True}
            return _ready(vae, dtype), source
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else unreachable
        raise InputError(
            f"--pretrained {path_or_id}: cannot reach the model hub ({why}); pass a local folder or set "
            "HF_HUB_OFFLINE=1 with a cached model"
        )
    errors = []
    for sub in tries:
        try:
            vae = _from_pretrained(path_or_id, sub, dtype)
        except InputError:
            raise  # found, but not a supported class
        except Exception as e:  # offline, missing repo, missing subfolder: try the next layout, then report
            errors.append(f"subfolder {sub or '(top level)'}: {e}")
            continue
        return _ready(vae, dtype), {"kind": "pretrained", "path": path_or_id, "subfolder": sub, "hub": True}
    raise InputError(
        f"--pretrained {path_or_id}: no such local folder, and loading it from the hub failed ("
        + "; ".join(errors)
        + ")"
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_unreachable(timeout: float = 3.0) -> Optional[str]:
    """Why the hub cannot be reached (one TCP connection to it, or to the HTTPS proxy), or ``None`` if it can."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    target = endpoint
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") if endpoint.scheme == "https" else None
    if proxy:
        target = urlparse(proxy if "://" in proxy else "http://" + proxy)
    host = target.hostname
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or type(e).__name__}"
    return None


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch-pickled (``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin``) state dict on the CPU.

    Pickles are read with ``weights_only=True`` (no code runs). A ``{"state_dict": ...}`` wrapper, as training
    frameworks write, is unwrapped.
    """
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise InputError(f"checkpoint file not found: {path}")
    if p.suffix.lower() not in _STATE_DICT_EXTS:
        raise InputError(f"checkpoint {path}: unsupported extension {p.suffix!r}; use one of {', '.join(_STATE_DICT_EXTS)}")
    try:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors' SafetensorError, pickle's UnpicklingError, RuntimeError on bad zips
        raise InputError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"checkpoint {path} is not a state dict of tensors")
    return sd


# (original Wan name, diffusers name) of the weights that fix the config.
_SHAPE_KEYS = {
    "encoder_in": ("encoder.conv1.weight", "encoder.conv_in.weight"),
    "decoder_in": ("decoder.conv1.weight", "decoder.conv_in.weight"),
    "post_quant": ("conv2.weight", "post_quant_conv.weight"),
}


def infer_wan_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """The diffusers config of a Wan VAE state dict (original or diffusers key names), from its weight shapes.

    ``encoder.conv_in`` is (base_dim, in_channels, 3, 3, 3): 3 input channels is Wan2.1, 12 (RGB folded 2x2 by
    patchify) is Wan2.2. ``decoder.conv_in`` is (decoder_base_dim x dim_mult[-1], z_dim, ...), ``post_quant_conv``
    (z_dim, z_dim, 1, 1, 1). Real Wan2.1 (z_dim 16) keeps diffusers' real latents_mean/std; for any other latent
    width they are unknown here and set to ``None`` (:func:`denormalize_latents` then asks for a real config).
    """
    shapes = {}
    for what, names in _SHAPE_KEYS.items():
        found = [state_dict[n].shape for n in names if n in state_dict]
        if not found:
            raise InputError(
                f"not a Wan VAE checkpoint: no {' or '.join(names)} "
                f"(first keys: {', '.join(list(state_dict)[:4])})"
            )
        shapes[what] = tuple(found[0])
    base_dim, in_channels = shapes["encoder_in"][:2]
    z_dim = shapes["post_quant"][0]
    if in_channels == 3:
        layout = "wan2.1"
    elif in_channels == 12:
        layout = "wan2.2"
    else:
        raise InputError(f"not a Wan2.1/Wan2.2 VAE: the encoder's first conv takes {in_channels} channels (3 or 12)")
    cfg = wan_config(layout, base_dim=base_dim, z_dim=z_dim)
    cfg["decoder_base_dim"] = shapes["decoder_in"][0] // cfg["dim_mult"][-1] if layout == "wan2.2" else None
    if not (layout == "wan2.1" and z_dim == 16):
        cfg["latents_mean"] = cfg["latents_std"] = None
    return cfg


def load_single_file(
    path: str,
    config: Optional[str] = None,
    subfolder: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[AutoencoderKLWan, dict]:
    """``AutoencoderKLWan.from_single_file`` of a checkpoint file, with a local config unless ``config`` is given.

    Original Wan key names are converted by diffusers' own ``convert_wan_vae_to_diffusers``; diffusers key names
    pass through it unchanged. Missing or unexpected keys are an error (never a silently half-random model).
    """
    sd = read_state_dict(path)
    source = {"kind": "single_file", "path": str(path)}
    if config is not None:
        local = _is_local(config)
        cfg_path = os.path.expanduser(config)
        sub = _local_subfolder(Path(cfg_path), subfolder) if local else subfolder
        try:
            cls = _config_class(cfg_path, sub or None, local_files_only=local)
        except InputError:
            raise
        except Exception as e:  # an unreachable hub id, a config.json that is not a model config
            raise InputError(f"cannot read the VAE config {config}: {type(e).__name__}: {e}") from e
        if cls is not AutoencoderKLWan:
            return _load_other_single_file(cls, sd, path, cfg_path, sub, local, dtype, source, config)
    with tempfile.TemporaryDirectory(prefix="pv-config-") as tmp:
        if config is None:
            cfg = infer_wan_config(sd)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({"_class_name": "AutoencoderKLWan", **cfg}, f)
            cfg_path, sub, local = tmp, None, True
            source["config"] = "inferred from weight shapes"
        else:
            local = _is_local(config)
            cfg_path = os.path.expanduser(config)
            sub = _local_subfolder(Path(cfg_path), subfolder) if local else subfolder
            source["config"] = config + (f"/{sub}" if sub else "")
        # from_single_file drops unexpected keys and may leave missing ones at their random init, so compare the
        # checkpoint's (converted) names with the config's before loading: a mismatch is an error, never a
        # silently half-random model.
        try:
            expected = set(_reference_keys(cfg_path, sub or None, local))
        except Exception as e:  # a hub id that cannot be reached, a config.json that is not a Wan VAE config
            raise InputError(f"cannot read the VAE config {source['config']}: {type(e).__name__}: {e}") from e
        converted = _converted_keys(sd)
        if converted != expected:
            extra, absent = sorted(converted - expected), sorted(expected - converted)
            raise InputError(
                f"checkpoint {path} does not match the VAE config: {len(absent)} weights missing "
                f"(e.g. {absent[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
            )
        try:
            # from_single_file takes the state dict itself (read once, above, with a clear error if unreadable).
            with _quiet_diffusers():
                vae = AutoencoderKLWan.from_single_file(
                    sd, config=cfg_path, subfolder=sub or None, torch_dtype=dtype, local_files_only=local
                )
        except Exception as e:  # shape mismatches (RuntimeError / ValueError), hub errors for a remote config
            raise InputError(f"cannot load single-file checkpoint {path}: {type(e).__name__}: {e}") from e
    return _ready(vae, dtype), source


def _load_other_single_file(cls, sd, path, cfg_path, sub, local, dtype, source, config):
    """A non-Wan family's single file: diffusers key names are checked against the config's model exactly; other
    key names (the original repositories') go through the class's own ``from_single_file`` conversion, and a
    weight it left uninitialized is an error."""
    source["config"] = config + (f"/{sub}" if sub else "")
    cfg = cls.load_config(cfg_path, subfolder=sub or None, local_files_only=local)
    with _quiet_diffusers(), torch.device("meta"):
        expected = set(cls.from_config(cfg).state_dict())
    try:
        if set(sd) & expected:  # diffusers key names: load exactly, nothing missing, nothing extra
            if set(sd) != expected:
                extra, absent = sorted(set(sd) - expected), sorted(expected - set(sd))
                raise InputError(
                    f"checkpoint {path} does not match the VAE config: {len(absent)} weights missing "
                    f"(e.g. {absent[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
                )
            with _quiet_diffusers():
                vae = cls.from_config(cfg)
            vae.load_state_dict(sd, strict=True)
        else:
            if not hasattr(cls, "from_single_file"):
                raise InputError(f"{cls.__name__} has no single-file loader in diffusers; save it with save_pretrained")
            with _quiet_diffusers():
                vae = cls.from_single_file(
                    sd, config=cfg_path, subfolder=sub or None, torch_dtype=dtype, local_files_only=local
                )
    except InputError:
        raise
    except Exception as e:  # shape mismatches, conversion errors
        raise InputError(f"cannot load single-file checkpoint {path}: {type(e).__name__}: {e}") from e
    if any(p.is_meta for p in vae.parameters()):
        raise InputError(f"checkpoint {path} left some weights of {cls.__name__} unset: it does not match the config")
    return _ready(vae, dtype), source


@contextlib.contextmanager
def _quiet_diffusers():
    """Silence diffusers' warnings while loading: ModelMixin warns about keep-in-fp32 modules on every dtype cast,
    even though Wan has none, which would print once per rank on every run."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _reference_keys(cfg_path: str, subfolder: Optional[str], local: bool) -> list[str]:
    cfg = AutoencoderKLWan.load_config(cfg_path, subfolder=subfolder, local_files_only=local)
    with _quiet_diffusers(), torch.device("meta"):
        return list(AutoencoderKLWan.from_config(cfg).state_dict())


def _converted_keys(sd: dict) -> set[str]:
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return set(convert_wan_vae_to_diffusers(dict(sd)))


def _ready(vae: AutoencoderKLWan, dtype: torch.dtype) -> AutoencoderKLWan:
    if vae.dtype != dtype:
        with _quiet_diffusers():
            vae = vae.to(dtype)
    # eval mode (no dropout; Wan has none at inference anyway); requires_grad is left alone for fine-tuning.
    return vae.eval()


def describe_vae(vae) -> dict:
    """The facts about a VAE that recipes log: family, class, widths, factors, dtype, parameter count."""
    adapter = adapter_for(vae)
    if not isinstance(vae, AutoencoderKLWan):
        return {
            "family": adapter.name,
            "class": type(vae).__name__,
            "latent_channels": latent_channels(vae),
            "spatial_factor": spatial_factor(vae),
            "temporal_factor": adapter.temporal_factor(vae),
            "video": adapter.video,
            "dtype": str(vae.dtype).replace("torch.", ""),
            "parameters": int(sum(p.numel() for p in vae.parameters())),
        }
    cfg = vae.config
    return {
        "family": adapter.name,
        "class": type(vae).__name__,
        "layout": "wan2.2" if cfg.patch_size else "wan2.1",
        "base_dim": int(cfg.base_dim),
        "decoder_base_dim": int(cfg.decoder_base_dim or cfg.base_dim),
        "z_dim": latent_channels(vae),
        "spatial_factor": spatial_factor(vae),
        "temporal_factor": int(cfg.scale_factor_temporal),
        "dtype": str(vae.dtype).replace("torch.", ""),
        "parameters": int(sum(p.numel() for p in vae.parameters())),
    }


# --------------------------------------------------------------------------------------------------------------
# latents
# --------------------------------------------------------------------------------------------------------------


def _pick(tensors: dict, key: Optional[str], path: str):
    if key is not None:
        if key not in tensors:
            raise InputError(f"latents file {path} has no entry {key!r} (it has: {', '.join(map(str, tensors))})")
        return tensors[key]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    for k in _LATENT_KEYS:
        if k in tensors:
            return tensors[k]
    raise InputError(
        f"latents file {path} holds {len(tensors)} entries ({', '.join(map(str, tensors))}); "
        f"name one with --latents_key"
    )


def load_latents(path: str, key: Optional[str] = None, ndim: int = 5) -> torch.Tensor:
    """Read latents (B, C, T, h, w) for video families (``ndim`` 5) or (B, C, h, w) for image families (``ndim``
    4), or one sample without the batch dim, as a float32 CPU tensor.

    Formats: ``.safetensors`` (a single tensor, or the one under ``key`` / ``latents`` / ``frames``), ``.pt`` /
    ``.pth`` / ``.bin`` (a tensor, or a dict of them, read with ``weights_only=True``), ``.npy``, ``.npz``.
    A Wan pipeline called with ``output_type="latent"`` returns its latents in ``output.frames``: save that tensor
    (they are normalized; see :func:`denormalize_latents`).
    """
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        raise InputError(f"--latents {path} is a directory; pass the latents file itself")
    if not p.is_file():
        raise InputError(f"latents file not found: {path}")
    ext = p.suffix.lower()
    if ext not in _LATENT_EXTS:
        raise InputError(f"latents file {path}: unsupported extension {ext!r}; use one of {', '.join(_LATENT_EXTS)}")
    try:
        if ext == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        elif ext == ".npy":
            obj = torch.from_numpy(np.load(str(p), allow_pickle=False))
        elif ext == ".npz":
            with np.load(str(p), allow_pickle=False) as npz:
                obj = {k: torch.from_numpy(npz[k]) for k in npz.files}
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # every reader has its own error types for a corrupt or foreign file
        raise InputError(f"cannot read latents file {path}: {type(e).__name__}: {e}") from e
    if isinstance(obj, (list, tuple)) and len(obj) == 1:
        obj = obj[0]
    if isinstance(obj, dict):
        obj = _pick(obj, key, path)
    elif key is not None:
        raise InputError(f"--latents_key {key!r} given, but {path} holds a single tensor")
    if not isinstance(obj, torch.Tensor):
        raise InputError(f"latents file {path} does not hold a tensor (found {type(obj).__name__})")
    if not obj.is_floating_point():
        raise InputError(f"latents in {path} are {obj.dtype}, expected floating point")
    if obj.dim() == ndim - 1:
        obj = obj.unsqueeze(0)  # one sample -> a batch of one
    if obj.dim() != ndim:
        layout = "(batch, channels, frames, height, width)" if ndim == 5 else "(batch, channels, height, width)"
        raise InputError(f"latents in {path} have shape {tuple(obj.shape)}; this model's latents are {layout}")
    if obj.numel() == 0:
        raise InputError(f"latents in {path} are empty: shape {tuple(obj.shape)}")
    if not torch.isfinite(obj).all():
        raise InputError(f"latents in {path} contain NaN or infinite values")
    return obj.float().contiguous()


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cfg, z_dim = vae.config, latent_channels(vae)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is None or std is None or len(mean) != z_dim or len(std) != z_dim:
        have = "none" if mean is None else f"{len(mean)} values"
        raise InputError(
            f"--latents_normalized needs the model config's latents_mean/latents_std with z_dim={z_dim} values "
            f"(the config has {have}); load the model with its real config (--pretrained, or --config for "
            "--single_file)"
        )
    shape = (1, z_dim) + (1,) * (like.dim() - 2)
    return (
        torch.tensor(mean, dtype=like.dtype, device=like.device).view(shape),
        torch.tensor(std, dtype=like.dtype, device=like.device).view(shape),
    )


def denormalize_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """Undo the family's pipeline latent normalization, for latents saved from a pipeline (``output_type="latent"``).

    Wan / Qwen-Image: ``z * latents_std + latents_mean`` per channel (``WanPipeline`` decodes with
    ``latents / (1 / std) + mean``); AutoencoderKL families: ``z / scaling_factor + shift_factor``; Flux.2:
    un-BatchNorm and unpatchify; the others as their adapter says."""
    adapter = adapter_for(vae)
    if adapter.uses_latent_stats:
        _latent_stats(vae, latents)  # a clear error when the config has no (or wrong-length) statistics
    return adapter.denormalize(vae, latents)


def normalize_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """Inverse of :func:`denormalize_latents`."""
    adapter = adapter_for(vae)
    if adapter.uses_latent_stats:
        _latent_stats(vae, latents)
    return adapter.normalize(vae, latents)
