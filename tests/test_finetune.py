"""recipes/finetune.py through ``accelerate launch`` on CPU (gloo): layout exactness under DDP and DeepSpeed ZeRO-2,
training progress, validation logging, exact resume, plain-diffusers export, and bad input on every rank."""

from __future__ import annotations

import functools
import glob
import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan

from parallel_vae.jobs.data import make_dataset
from parallel_vae.jobs.finetune_job import lr_factor
from parallel_vae.jobs.metrics import psnr
from parallel_vae.jobs.models import build_wan_vae
from tests.launch import accelerate_launch, check_ok, python_run

RECIPE = "recipes/finetune.py"
SMALL = ["--seeded", "wan2.1:8:4", "--frames", "5", "--height", "32", "--width", "32", "--val_data", "synthetic:2"]

# One SGD step in float64: the update is proportional to the gradient, so any gradient error shows (an Adam first
# step is ~sign(gradient) and would hide it). Posterior sampling, KL, L1 + MSE and clipping all take part.
EXACT = SMALL + [
    "--dtype", "float64", "--optimizer", "sgd", "--lr", "0.5", "--max_steps", "1", "--validate_every", "0",
    "--sample_posterior", "--l1", "1", "--mse", "0.5", "--kl", "153.6", "--data", "synthetic:8",
]  # fmt: skip
# --kl 153.6 on the per-pixel-element KL (3*5*32*32 = 15360 elements per clip) is the per-sample weight 0.01 these
# tests used before the KL normalization changed: the same loss, so the DeepSpeed bars below (set by DeepSpeed's
# fp32 gradient reduction) apply unchanged. With a weaker KL (--kl 50), ZeRO-2 missed the per-parameter bar on one
# norm gain (2.9e-4 on encoder.down_blocks.1.norm1.gamma, L2 still 8e-7). Its update is small, and an fp32 sum's
# rounding scales with the summands, not with the sum.


def _weights(folder: str) -> dict:
    return AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch.float64).state_dict()


@functools.lru_cache(maxsize=None)
def _initial() -> dict:
    return build_wan_vae("wan2.1", base_dim=8, z_dim=4, seed=0, dtype=torch.float64).state_dict()


def _update_errs(folder: str, ref_folder: str) -> dict:
    """Update = weights after the step - initial weights. Returns the worst per-parameter max-abs relative error
    (docs/how-it-works.md's measure) with its parameter, and the relative L2 error of the whole update vector."""
    init, ref, got = _initial(), _weights(ref_folder), _weights(folder)
    worst, name, num, den = 0.0, "", 0.0, 0.0
    for k in init:
        du_ref, du = ref[k] - init[k], got[k] - init[k]
        num += (du - du_ref).pow(2).sum().item()
        den += du_ref.pow(2).sum().item()
        scale = du_ref.abs().max().item()
        err = (du - du_ref).abs().max().item() / scale if scale else du.abs().max().item()
        if err > worst:
            worst, name = err, k
    return {"max_rel": worst, "param": name, "l2_rel": (num / den) ** 0.5}


@functools.lru_cache(maxsize=None)
def _single_step(tmp: str, clip: str) -> str:
    """The reference: one plain process with the whole global batch of 2 clips."""
    out = os.path.join(tmp, f"single-clip{clip}")
    check_ok(python_run(RECIPE, EXACT + ["--batch_size", "2", "--max_grad_norm", clip, "--output_dir", out], Path(tmp)))
    return os.path.join(out, "final")


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("single"))


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "config,world,sp,batch,extra",
    [
        ("cpu_2proc.yaml", 2, 2, 2, []),  # DDP, S=2
        ("cpu_2proc.yaml", 4, 2, 1, ["--gradient_checkpointing"]),  # DDP, D=2 x S=2, halos recomputed in backward
    ],
    ids=["ddp-S2", "ddp-D2xS2-ckpt"],
)
def test_one_step_equals_single_process_ddp(reference_dir, tmp_path, config, world, sp, batch, extra):
    """DDP: the float64 bar, 1e-10, with gradient clipping on."""
    args = EXACT + ["--max_grad_norm", "0.05", "--sp_degree", str(sp), "--batch_size", str(batch)]
    check_ok(accelerate_launch(RECIPE, args + ["--output_dir", str(tmp_path / "out"), *extra], tmp_path, config=config, num_processes=world, timeout=540))
    errs = _update_errs(str(tmp_path / "out" / "final"), _single_step(reference_dir, "0.05"))
    assert errs["max_rel"] <= 1e-10, f"updated weights differ from the single process: {errs}"


# DeepSpeed (0.19.8) reduces gradients in float32 whenever the model is not fp16/bf16 (engine.py,
# communication_data_type; its config accepts only fp16/bf16/fp32) and computes the clipping norm in float32
# (stage_1_and_2.py), so float64 parameters cannot get a float64-exact step under DeepSpeed: 1e-10 is unreachable
# by construction. DeepSpeed runs are held instead to float32 *communication* accuracy, without DeepSpeed's own
# clipping: measured 1.5e-7 relative L2 over the whole update and 4.1e-6 worst per parameter; a contract bug
# (wrong loss scale, wrong group, a missing halo gradient) gives errors of 1e-1 and more.
DS_L2_BAR, DS_PARAM_BAR = 1e-6, 1e-4


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "world,sp,batch,extra",
    [(2, 2, 2, []), (4, 2, 1, ["--gradient_checkpointing"])],
    ids=["zero2-S2", "zero2-D2xS2-ckpt"],
)
def test_one_step_equals_single_process_deepspeed_zero2(reference_dir, tmp_path, world, sp, batch, extra):
    args = EXACT + ["--max_grad_norm", "0", "--sp_degree", str(sp), "--batch_size", str(batch)]
    proc = accelerate_launch(
        RECIPE, args + ["--output_dir", str(tmp_path / "out"), *extra], tmp_path,
        config="cpu_deepspeed_zero2.yaml", num_processes=world, timeout=540,
    )  # fmt: skip
    check_ok(proc)
    errs = _update_errs(str(tmp_path / "out" / "final"), _single_step(reference_dir, "0"))
    assert errs["l2_rel"] <= DS_L2_BAR and errs["max_rel"] <= DS_PARAM_BAR, errs


# A short real run (DDP, S=2) with validation, checkpoints every 3 steps and wandb offline; and the same run cut
# after 3 steps and resumed. Every step sees the same 2 clips, so the loss is comparable from step to step.
# A 2-step warm-up: the logged rates show the schedule advancing once per optimizer step on 2 processes.
TRAIN = SMALL + [
    "--dtype", "float64", "--lr", "3e-3", "--warmup_steps", "2", "--max_steps", "6", "--validate_every", "3", "--checkpoint_every", "3",
    "--data", "synthetic:2", "--batch_size", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("full")
    out = tmp / "out"
    check_ok(accelerate_launch(RECIPE, TRAIN + ["--output_dir", str(out), "--report_to", "wandb"], tmp, timeout=540))
    return out


def _summary(out: Path) -> dict:
    with open(out / "finetune_summary.json") as f:
        return json.load(f)


@pytest.mark.timeout(600)
def test_training_reduces_loss_and_logs_validation(full_run):
    s = _summary(full_run)
    losses = [h["loss"] for h in s["history"]]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[2] < losses[0], losses
    assert [h["lr"] for h in s["history"]] == [3e-3 * lr_factor(k, warmup=2, total=6, schedule="constant") for k in range(6)]
    assert [v["step"] for v in s["validation"]] == [3, 6]
    for v in s["validation"]:
        assert 0 < v["psnr"] < 100 and -1 <= v["ssim"] <= 1 and v["clips"] == 2
        assert len(v["peak_memory_bytes_per_rank"]) == 2 and min(v["peak_memory_bytes_per_rank"]) > 0
        assert len(v["step_seconds_per_rank"]) == 2
    assert sorted(os.listdir(full_run / "samples")) == ["step_000003.mp4", "step_000006.mp4"]
    runs = glob.glob(str(full_run / "wandb" / "offline-run-*"))
    assert runs, "no offline wandb run folder"
    assert sorted(os.listdir(full_run / "checkpoints")) == ["step_000003", "step_000006"]


def test_lr_schedules():
    f = functools.partial(lr_factor, warmup=4, total=14)
    assert [f(k, schedule="constant") for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [f(k, schedule="linear") for k in (3, 4, 9, 14, 20)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    cos = [f(k, schedule="cosine") for k in range(4, 15)]
    assert cos[0] == 1.0 and abs(cos[5] - 0.5) < 1e-12 and cos[-1] == 0.0
    assert all(a > b for a, b in zip(cos, cos[1:]))
    with pytest.raises(ValueError, match="schedule"):
        f(5, schedule="step")


@pytest.mark.timeout(600)
def test_resume_continues_exactly(full_run, tmp_path):
    out = tmp_path / "out"
    first = TRAIN + ["--output_dir", str(out)]
    cut = first.copy()
    cut[cut.index("--max_steps") + 1] = "3"
    check_ok(accelerate_launch(RECIPE, cut, tmp_path, timeout=540))
    check_ok(accelerate_launch(RECIPE, first + ["--resume", "latest"], tmp_path, timeout=540))
    resumed, full = _summary(out), _summary(full_run)
    assert resumed["start_step"] == 3
    # The summary keeps the steps from before the resume (saved with the checkpoint), not only those after it.
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4, 5, 6]
    assert [v["step"] for v in resumed["validation"]] == [3, 6]
    # Same machine, same threads, float64: the resumed run is the uninterrupted run, bit for bit.
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert [v["psnr"] for v in resumed["validation"]] == [v["psnr"] for v in full["validation"]]


@pytest.mark.timeout(300)
def test_export_loads_in_plain_diffusers_with_the_same_outputs(full_run):
    """The recipe's last validation PSNR (computed through the parallel decode path) is reproduced by the exported
    folder loaded in plain diffusers, single process, on the same held-out clips."""
    vae = AutoencoderKLWan.from_pretrained(str(full_run / "final"), torch_dtype=torch.float64)
    assert type(vae.decoder.conv_out).__name__ == "WanCausalConv3d"
    val = make_dataset("synthetic:2", frames=5, height=32, width=32, spatial_factor=8, seed=0 + 7919)
    scores = []
    with torch.no_grad():
        for i in range(len(val)):
            clip = val[i][None].double()
            recon = vae.decode(vae.encode(clip).latent_dist.mode()).sample
            scores.append(psnr(recon, clip))
    expected = _summary(full_run)["validation"][-1]["psnr"]
    # float64 throughout: the parallel path and plain diffusers agree to ~1e-15, so PSNR to far better than 1e-10.
    assert sum(scores) / len(scores) == pytest.approx(expected, rel=1e-10)


@pytest.mark.timeout(300)
def test_train_decoder_keeps_the_encoder_frozen(tmp_path):
    args = SMALL + ["--train", "decoder", "--max_steps", "2", "--lr", "1e-2", "--validate_every", "0", "--output_dir", str(tmp_path / "o")]
    check_ok(python_run(RECIPE, args + ["--data", "synthetic:4"], tmp_path))
    init = build_wan_vae("wan2.1", base_dim=8, z_dim=4, seed=0).state_dict()
    got = AutoencoderKLWan.from_pretrained(str(tmp_path / "o" / "final")).state_dict()
    for k in init:
        same = torch.equal(init[k], got[k])
        if k.startswith(("encoder.", "quant_conv.")):
            assert same, k
    assert not torch.equal(init["decoder.conv_out.weight"], got["decoder.conv_out.weight"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "args,message",
    [
        (["--sp_degree", "3"], "--sp_degree 3 does not divide the world size 2; use one of [1, 2]"),
        (["--height", "8"], "clips of height 8 have 1 latent rows, too few to shard over --sp_degree 2"),
        (["--data", "EMPTY"], "EMPTY"),
        (["--seeded", "wan2.2:8:4", "--inflate"], "--inflate: inflate_temporal needs a Wan2.1 layout"),
    ],
    ids=["sp-not-dividing", "clip-too-small", "empty-folder", "inflate-wan22"],
)
def test_bad_input_one_clear_error_on_every_rank(tmp_path, args, message):
    empty = tmp_path / "empty_data"
    empty.mkdir()
    args = [str(empty) if a == "EMPTY" else a for a in args]
    message = message.replace("EMPTY", str(empty))
    proc = accelerate_launch(RECIPE, SMALL + ["--output_dir", str(tmp_path / "o")] + args, tmp_path, timeout=240)
    assert proc.returncode != 0
    err = proc.stderr
    assert err.count("finetune.py: error:") == 1, err[-4000:]
    assert message in err, err[-4000:]
    assert 'File "' + str(Path(__file__).resolve().parents[1] / "parallel_vae") not in err, "a traceback from our code"
    assert not (tmp_path / "o" / "final").exists()


@pytest.mark.timeout(300)
def test_seeded_init_needs_a_seeded_model(tmp_path):
    proc = python_run(RECIPE, ["--seeded_init", "zero_residual", "--output_dir", str(tmp_path / "o")], tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("finetune.py: error:") == 1, proc.stderr[-4000:]
    assert "--seeded_init applies to a --seeded model only" in proc.stderr, proc.stderr[-4000:]


@pytest.mark.timeout(600)
def test_single_frame_training_then_inflated_video_training(tmp_path):
    """The two stages the embedded checkpoint was trained with. Stage 1 trains on single frames over DDP: the
    temporal resampling convolutions get no gradient then (DDP used to stop with 'parameters that were not used in
    producing loss'), so the recipe freezes them. Stage 2 starts from that export with --inflate, on video."""
    common = ["--height", "32", "--width", "32", "--val_data", "synthetic:2", "--validate_every", "0", "--lr", "1e-2"]
    one = tmp_path / "frames1"
    stage1 = ["--seeded", "wan2.1:8:4", "--seeded_init", "zero_residual", "--frames", "1", "--sp_degree", "1", "--data", "synthetic:4",
              "--max_steps", "2", "--output_dir", str(one)] + common  # fmt: skip
    check_ok(accelerate_launch(RECIPE, stage1, tmp_path, timeout=540))
    init = build_wan_vae("wan2.1", base_dim=8, z_dim=4, seed=0, init="zero_residual").state_dict()
    got = AutoencoderKLWan.from_pretrained(str(one / "final")).state_dict()
    time_keys = [k for k in init if ".time_conv." in k]
    assert len(time_keys) == 8  # 2 downsample3d + 2 upsample3d, weight and bias
    assert all(torch.equal(init[k], got[k]) for k in time_keys)
    assert not torch.equal(init["decoder.conv_out.weight"], got["decoder.conv_out.weight"])
    assert _summary(one)["model_source"]["init"] == "zero_residual"

    video = tmp_path / "frames5"
    stage2 = ["--pretrained", str(one / "final"), "--inflate", "--frames", "5", "--data", "synthetic:2",
              "--max_steps", "1", "--output_dir", str(video)] + common  # fmt: skip
    check_ok(python_run(RECIPE, stage2, tmp_path))
    assert _summary(video)["model_source"]["inflated"] is True
    final = AutoencoderKLWan.from_pretrained(str(video / "final")).state_dict()
    # trained from the inflated start: the temporal convolutions now learn (they were frozen in stage 1)
    assert not torch.equal(final["decoder.up_blocks.0.upsamplers.0.time_conv.weight"],
                           got["decoder.up_blocks.0.upsamplers.0.time_conv.weight"])  # fmt: skip


# Perceptual + adversarial terms (seeded LPIPS saved by the test, a fresh seeded discriminator, adaptive weight)
# on an uneven split (40 rows: 24/16 on 2 ranks), the discriminator starting at step 1 of 4 so the cut at step 2
# lands after it started. SGD for both models, so the layout comparison sees gradient errors.
def _lpips_file(tmp: Path) -> str:
    from safetensors.torch import save_file

    from parallel_vae.perceptual import seeded_lpips

    path = tmp / "lpips.safetensors"
    sd = seeded_lpips((4, 8, 8, 16, 16), seed=3, dtype=torch.float64).state_dict()  # small widths, seeded: no real weights
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


GAN = [
    "--seeded", "wan2.1:8:4", "--frames", "1", "--height", "40", "--width", "32", "--val_data", "synthetic:1",
    "--dtype", "float64", "--optimizer", "sgd", "--lr", "0.05", "--max_steps", "4", "--validate_every", "0",
    "--checkpoint_every", "2", "--data", "synthetic:2", "--batch_size", "2", "--perceptual_weight", "1.0",
    "--disc_weight", "0.5", "--disc_start", "1", "--disc_ndf", "4", "--disc_layers", "2", "--disc_optimizer", "sgd",
    "--disc_lr", "0.1",
]  # fmt: skip
_GAN_KEYS = ("loss", "l1", "kl", "perceptual", "d_loss", "g_loss", "d_weight")


@pytest.mark.timeout(600)
def test_perceptual_and_adversarial_losses_sharded_exact_and_resume_bit_identical(tmp_path):
    """S=2 (uneven rows) equals one process in float64 over 4 steps (the logged losses and adaptive weights depend
    on every earlier update of both models); a run cut at step 2 and resumed is the uninterrupted run, bit for bit."""
    args = GAN + ["--perceptual_weights_file", _lpips_file(tmp_path)]
    check_ok(python_run(RECIPE, args + ["--output_dir", str(tmp_path / "single")], tmp_path, timeout=540))
    check_ok(accelerate_launch(RECIPE, args + ["--output_dir", str(tmp_path / "full")], tmp_path, timeout=540))
    single, full = _summary(tmp_path / "single")["history"], _summary(tmp_path / "full")["history"]
    assert [sorted(h) for h in full] == [sorted(h) for h in single] and "d_weight" in full[1] and "d_weight" not in full[0]
    for a, b in zip(full, single):
        for k in _GAN_KEYS:
            if k in b:
                assert abs(a[k] - b[k]) <= 1e-10 * max(abs(b[k]), 1e-3), (k, a, b)
    # The resume starts from the full run's own step-2 checkpoint (the state a run cut at step 2 leaves: the
    # checkpoint is written before step 3 starts), into a new folder: one launch fewer than cutting a third run.
    step2 = tmp_path / "full" / "checkpoints" / "step_000002"
    assert step2.is_dir(), sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    resume = args + ["--output_dir", str(tmp_path / "resumed"), "--resume", str(step2)]
    check_ok(accelerate_launch(RECIPE, resume, tmp_path, timeout=540))
    resumed = _summary(tmp_path / "resumed")
    assert resumed["start_step"] == 2
    assert [{k: h.get(k) for k in _GAN_KEYS} for h in resumed["history"]] == [{k: h.get(k) for k in _GAN_KEYS} for h in full]
    assert _weights(str(tmp_path / "resumed" / "final")).keys() == _weights(str(tmp_path / "full" / "final")).keys()
    assert all(torch.equal(a, b) for a, b in zip(_weights(str(tmp_path / "resumed" / "final")).values(),
                                                  _weights(str(tmp_path / "full" / "final")).values()))  # fmt: skip
