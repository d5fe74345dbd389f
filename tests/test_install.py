"""The library with no extra: a fresh venv that holds only the core dependencies imports parallel_vae and runs a
2-process sharded decode, exact against the unmodified diffusers model; a recipe run there names its extra.

The fresh venv has no system site-packages. Instead of downloading torch (multi-GB) and diffusers again, it gets
the installed distributions of the core requirements -- torch, diffusers, safetensors, numpy, and what their own
metadata requires, nothing else -- as symlinks from the running interpreter's site-packages, with their
.dist-info, so pip sees them as installed. Then ``pip install --no-deps --no-build-isolation -e`` installs a copy
of this checkout, and the installed metadata is checked: no extra's package is a core requirement. DeepSpeed,
wandb, transformers and accelerate are then not importable there, which the worker asserts before it decodes.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
import warnings

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ("torch", "diffusers", "safetensors", "numpy")
EXTRA_ONLY = ("accelerate", "deepspeed", "transformers", "wandb", "imageio", "scikit-image", "matplotlib", "mkdocs")
# pip needs these to build the editable install without build isolation (no download).
BUILD = ("setuptools", "wheel")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(names) -> dict:
    """Installed distributions of ``names`` and of everything their unconditional requirements pull in."""
    found, todo = {}, list(names)
    while todo:
        name = todo.pop()
        if _norm(name) in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional build helper (wheel) that is not installed
        found[_norm(name)] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def _link_dists(dists, site: str) -> None:
    """Symlink each distribution's top-level files and folders (from its RECORD) into ``site``."""
    src = sysconfig.get_paths()["purelib"]
    for dist in dists:
        tops = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            path = os.path.join(src, top)
            dest = os.path.join(site, top)
            if os.path.exists(path) and not os.path.lexists(dest) and top != "__pycache__":
                os.symlink(path, dest)


def _copy_checkout(dest: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    for rel in files:
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))


WORKER = textwrap.dedent(
    '''
    import importlib.util, os, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp

    def rank_main(rank, world, store, out):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        import parallel_vae as pv
        from diffusers import AutoencoderKLWan
        torch.manual_seed(0)
        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               attn_scales=[], temperal_downsample=[False, True, True]).double().eval()
        z = torch.randn(1, 4, 2, 5, 6, dtype=torch.float64)  # 5 latent rows on 2 ranks: 3/2
        with torch.no_grad():
            ref = vae.decode(z).sample
            pv.enable_spatial_parallelism(vae, dist.group.WORLD)
            local = pv.sharded_decode(vae, pv.shard_latents(vae, z))
            full = pv.gather_shards(vae, local)
        err = ((full - ref).abs().max() / ref.abs().max()).item()
        if rank == 0:
            with open(out, "w") as f:
                f.write(f"{err} {tuple(local.shape)} {pv.__file__}")
        dist.destroy_process_group()

    if __name__ == "__main__":
        absent = [m for m in ("deepspeed", "wandb", "transformers", "accelerate") if importlib.util.find_spec(m)]
        assert not absent, f"importable in the core-only venv: {absent}"
        store, out = sys.argv[1], sys.argv[2]
        mp.spawn(rank_main, args=(2, store, out), nprocs=2)
    '''
)


@pytest.mark.timeout(240)
def test_core_install_decodes_without_extras(tmp_path):
    env_dir, src = str(tmp_path / "venv"), str(tmp_path / "src")
    venv.EnvBuilder(with_pip=False, system_site_packages=False, symlinks=True).create(env_dir)
    py = os.path.join(env_dir, "bin", "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    dists = _closure(CORE + BUILD + ("pip",))
    leaked = sorted(set(dists) & {_norm(n) for n in EXTRA_ONLY})
    assert not leaked, f"the core requirements pull in {leaked}"
    _link_dists(dists.values(), site)
    _copy_checkout(src)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", WANDB_MODE="offline")
    pip = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "-e", src],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path))  # fmt: skip
    assert pip.returncode == 0, pip.stdout + pip.stderr

    # The installed metadata: the core requirements are exactly torch, diffusers (bounded), safetensors, numpy.
    meta = subprocess.run([py, "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('parallel_vae')))"],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), check=True).stdout.split("\n")  # fmt: skip
    core = sorted(Requirement(r).name for r in meta if r and "extra ==" not in r)
    assert core == sorted(CORE), core
    assert any(r.startswith("diffusers") and "<" in r for r in meta), meta

    worker, out = tmp_path / "worker.py", tmp_path / "result.txt"
    worker.write_text(WORKER)
    run = subprocess.run([py, str(worker), str(tmp_path / "store"), str(out)], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), timeout=180)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    err, shape, where = out.read_text().split(" ", 1)[0], *out.read_text().split(" ", 1)[1].rsplit(" ", 1)
    assert float(err) <= 1e-10, err
    assert shape.startswith("(1, 3, 5, 24,"), shape  # this rank's 3 latent rows -> 24 pixel rows
    assert where.startswith(src), where  # the editable install, not the running checkout

    # A recipe without its extra: one line naming it, before any launch machinery is needed.
    rec = subprocess.run([py, os.path.join(src, "recipes", "decode.py")], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), timeout=60)  # fmt: skip
    assert rec.returncode == 2, rec.stdout + rec.stderr
    assert "[recipes] extra" in rec.stderr and "pip install 'parallel_vae[recipes]'" in rec.stderr, rec.stderr


def test_diffusers_outside_tested_range_warns(monkeypatch):
    import diffusers

    from parallel_vae import _deps

    assert _deps.diffusers_in_tested_range(diffusers.__version__), diffusers.__version__  # what the suite tests
    assert _deps.diffusers_in_tested_range("0.42.0.dev0")
    for version in ("0.41.9", "0.43.0", "1.0.0"):
        assert not _deps.diffusers_in_tested_range(version)
    monkeypatch.setattr(_deps, "_warned", False)
    monkeypatch.setattr(diffusers, "__version__", "0.43.0")
    with pytest.warns(RuntimeWarning, match=r"tested with diffusers>=0\.42,<0\.43; diffusers 0\.43\.0"):
        _deps.check_diffusers()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _deps.check_diffusers()  # once per process


def test_tested_range_matches_pyproject():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    from parallel_vae import _deps

    (low, high) = _deps.TESTED_DIFFUSERS
    assert f'"diffusers>={low[0]}.{low[1]},<{high[0]}.{high[1]}"' in text
