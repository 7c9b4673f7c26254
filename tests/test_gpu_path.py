"""The GPU path, run on the CPU wherever torch can: torch.compile after DDP (with a backend that
compiles in seconds), checkpoints with the bare module's keys across a change of
``model.compile``, one EMA on every rank, a short loader named on every rank, fused SGD, the
ImageNet recipes' rates, and what the configuration accepts as typed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, subprocess_env
from safetensors.torch import load_file
from test_train import TINY, free_port, launch, metrics

from pipeline.config import ConfigError, load_config
from pipeline.train.recipe import build_optimizer, scaled_lr, scaling_warnings, warmup_epochs

# googlenet_bn: batch norm, so the EMA's buffers matter; 2 processes x 4 x 2 accumulated = 16 images
# per update, 6 updates per epoch of the 96 tiny images.
COMPILED = [*TINY, "model.name=googlenet_bn", "optim.grad_accum=2", "schedule.epochs=2", "ema.enabled=true",
            "ema.horizon_epochs=0.5", "model.compile_backend=aot_eager", "data.workers=1"]


def checkpoint_keys(run_dir: Path) -> tuple[list[str], list[str]]:
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    model = list(load_file(newest / "model.safetensors"))
    ema = load_file(newest / "ema.safetensors")
    return model, list(ema)


@pytest.fixture(scope="module")
def eager_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eager")
    launch(2, *COMPILED, f"data.dir={tiny_data}", f"output_dir={out}", "name=eager", cwd=out)
    return out / "eager"


@pytest.mark.slow
def test_compiled_after_ddp_trains_as_eager_and_resumes_across_a_compile_change(tiny_data, eager_run, tmp_path):
    """The first epoch compiled, the second resumed eagerly: the same losses and weights as the
    eager run (within the compiler's rounding), checkpoint keys without wrapper prefixes, and
    the model and its EMA identical on both ranks."""
    args = [*COMPILED, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=switch"]
    first = launch(2, *args, "model.compile=true", "train.max_steps=6", cwd=tmp_path)
    assert "compiled (aot_eager, default)" in first.stderr
    assert "native JPEG region decoding and resampling: o" in first.stderr  # on, or off and why
    assert "parameters identical on all 2 processes (model and EMA, with their buffers)" in first.stderr
    model_keys, ema_keys = checkpoint_keys(tmp_path / "switch")
    assert "conv1.conv.weight" in model_keys and not any("module." in k or "_orig_mod" in k for k in model_keys)
    assert "module.conv1.conv.weight" in ema_keys and not any("_orig_mod" in k for k in ema_keys)  # AveragedModel's own
    second = launch(2, *args, "model.compile=false", cwd=tmp_path)
    assert "resumed from" in second.stderr and "step 6" in second.stderr
    assert "parameters identical on all 2 processes (model and EMA, with their buffers)" in second.stderr
    switched, eager = metrics(tmp_path / "switch"), metrics(eager_run)
    assert [r["epoch"] for r in switched] == [r["epoch"] for r in eager] == [1, 2]
    for ours, reference in zip(switched, eager):
        for key in ("train_loss", "val_loss"):
            assert ours[key] == pytest.approx(reference[key], rel=2e-3, abs=2e-3), (ours["epoch"], key)
    final = sorted((tmp_path / "switch/checkpoints").glob("step-*"))[-1] / "model.safetensors"
    reference = sorted((eager_run / "checkpoints").glob("step-*"))[-1] / "model.safetensors"
    ours, theirs = load_file(final), load_file(reference)
    for name in theirs:
        if theirs[name].is_floating_point():
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-2, atol=1e-3, msg=name)


# Four classes told apart by their colour alone, which random crops, flips and the photometric
# distortions (brightness, contrast, saturation: the hue stays) all keep: googlenet_bn learns them
# in 3 epochs of 16 updates, where tiny_data's shapes at 32 px stay near chance for 8 epochs.
CLASS_COLOURS = ((220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 210, 40))
# Chance is 0.75 top-1 error on 4 balanced classes (64 validation images). The model has learnt
# at a third of that; its EMA, a few updates behind it, must then be clearly below chance too.
LEARNT, CLEARLY_BELOW_CHANCE = 0.25, 0.5
EMA_RUN = [*TINY, "model.name=googlenet_bn", "model.aux_logits=false", "schedule.epochs=3", "optim.lr=0.0125",
           "train.image_grid=false", "ema.enabled=true", "ema.horizon_epochs=2"]


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    """256 training images (2 processes x 8 x 16 updates per epoch) and 64 validation images of
    40 px, each its class's colour at a random brightness under pixel noise, prepared into shards."""
    import numpy as np
    from PIL import Image

    from data_prep.plan import PrepParams
    from data_prep.synthetic import wnid
    from data_prep.writer import run

    root = tmp_path_factory.mktemp("colours")
    images, rng = root / "images", np.random.default_rng(0)

    def save(label: int, path: Path) -> None:
        colour = np.array(CLASS_COLOURS[label]) * rng.uniform(0.6, 1.1)
        pixels = np.clip(colour + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)

    for label in range(len(CLASS_COLOURS)):
        (images / "train" / wnid(label)).mkdir(parents=True)
        for n in range(64):
            save(label, images / "train" / wnid(label) / f"{wnid(label)}_{n}.JPEG")
    (images / "val").mkdir()
    val_labels = rng.permutation(np.repeat(np.arange(len(CLASS_COLOURS)), 16))
    for i, label in enumerate(val_labels, start=1):
        save(label, images / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    (images / "val_labels.txt").write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {wnid(label)}\n"
                                                    for i, label in enumerate(val_labels, start=1)))
    run(PrepParams(train=str(images / "train"), val=str(images / "val"), val_labels=str(images / "val_labels.txt"),
                   shard_size=32), root / "shards")
    return root / "shards"


@pytest.mark.slow
def test_the_warmed_up_ema_learns_with_the_model_and_a_cold_one_does_not(colour_data, tmp_path):
    """Once the model is clearly below chance, so is its EMA, warmed up as timm does: early on it
    follows the weights. Without the warm-up, the same training (the EMA does not feed back into
    it) leaves an average that after 3 epochs of a 2-epoch horizon still holds e^-1.5, a fifth, of
    the random initial weights and batch-norm statistics: enough to make it predict one class."""
    runs = {}
    for warmup in ("true", "false"):
        name = f"warmup-{warmup}"
        launch(2, *EMA_RUN, f"data.dir={colour_data}", f"output_dir={tmp_path}", f"name={name}",
               f"ema.warmup={warmup}", cwd=tmp_path)
        runs[warmup] = metrics(tmp_path / name)
    model_errors = [r["val_top1_error"] for r in runs["true"]]
    assert [r["val_top1_error"] for r in runs["false"]] == model_errors  # seeded: the same model
    learnt = [i for i, error in enumerate(model_errors) if error <= LEARNT]
    assert learnt, model_errors  # else this test shows nothing
    for i in learnt:
        assert runs["true"][i]["ema_val_top1_error"] <= CLEARLY_BELOW_CHANCE, runs["true"][i]
        assert runs["false"][i]["ema_val_top1_error"] > CLEARLY_BELOW_CHANCE, runs["false"][i]


@pytest.mark.slow
def test_a_short_loader_is_named_on_every_rank(tiny_data, tmp_path):
    """Process 1's loader gives 2 batches of 12: both processes stop at the epoch's end with one
    line naming process 1 and the check to run, not a timeout or a lost peer."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(ROOT / "tests/short_loader_train.py"),
               *TINY, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=short", "train.collective_timeout_s=600"]
    env = subprocess_env() | {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode != 0
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert lines == [f"error: epoch 1: the loader of process 1 ran out of samples before the epoch's 12 batches; do "
                     f"the shards in {tiny_data} hold what the manifest says? (python -m data_prep verify {tiny_data})"]
    assert "ran out of samples; stopping at the next checkpoint or the epoch's end" in result.stderr
    assert "timed out" not in result.stderr
    assert not list((tmp_path / "short/checkpoints").glob("step-*"))  # no checkpoint of the short epoch


# ------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize("override", [
    "train.mixed_precision=no", "train.mixed_precision=bf16", "train.mixed_precision=fp16",
    "model.compile_mode=reduce-overhead", "model.compile_mode=max-autotune-no-cudagraphs",
    "model.compile_backend=inductor", "model.compile_backend=aot_eager", "model.compile_backend=eager",
    "data.format=ffcv", "data.loader=memory", "data.on_bad_sample=skip", "optim.lr_scaling=none",
    "schedule.name=poly", "model.name=googlenet_bn",
])
def test_every_documented_value_is_accepted_as_typed(override):
    key, value = override.split("=")
    section, name = key.split(".")
    config = load_config(None, [override] + (["data.format=webdataset"] if key == "data.loader" else []))
    assert getattr(getattr(config, section), name) == value


def test_strings_stay_strings_and_booleans_are_yaml_12s(tmp_path):
    config = load_config(None, ["name=2024", "data.dir=no", "model.compile=true", "model.channels_last=off"])
    assert (config.name, config.data.dir) == ("2024", "no")
    assert (config.model.compile, config.model.channels_last) == (True, False)
    assert load_config(None, ["data.dir=null"]).data.dir is None
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  mixed_precision: no\nmodel:\n  compile: yes\n")
    config = load_config(recipe)
    assert config.train.mixed_precision == "no" and config.model.compile is True
    with pytest.raises(ConfigError, match="model.compile: expected bool, got 'maybe'"):
        load_config(None, ["model.compile=maybe"])


def test_a_compiling_run_waits_longer_in_collectives():
    assert load_config(None, []).collective_timeout_s == 300
    assert load_config(None, ["model.compile=true"]).collective_timeout_s == 1800
    assert load_config(None, ["model.compile=true", "train.collective_timeout_s=60"]).collective_timeout_s == 60


def test_imagenet_recipes_at_published_rates():
    """0.1 per 256 images for the batch-norm recipe (Goyal et al.; FFCV's 1.7 at 4,096), BVLC's
    0.01 at 32 for the paper's; warnings beyond the references, and an automatic warm-up."""
    bn = load_config(ROOT / "configs/imagenet_bn.yaml")
    assert scaled_lr(bn.optim, 256) == pytest.approx(0.1) and scaled_lr(bn.optim, 4096) == pytest.approx(1.6)
    assert scaling_warnings(bn.optim, bn.schedule, 8192) == []
    (beyond,) = scaling_warnings(bn.optim, bn.schedule, 16384)
    assert "16384 images per update is beyond the 8192" in beyond and "optim.lr_max_batch" in beyond
    paper = load_config(ROOT / "configs/imagenet_paper.yaml")
    assert scaled_lr(paper.optim, 8 * 32) == pytest.approx(0.08)
    assert warmup_epochs(paper.schedule, paper.optim, 8 * 32) == 5  # 8x BVLC's batch: warmed up
    assert warmup_epochs(paper.schedule, paper.optim, 2 * 32) == 0  # 2x: none needed
    assert scaling_warnings(paper.optim, paper.schedule, 1024) == []
    assert "beyond the 1024" in scaling_warnings(paper.optim, paper.schedule, 2048)[0]
    paper.schedule.warmup_epochs = 0.0
    (cold,) = scaling_warnings(paper.optim, paper.schedule, 256)
    assert cold.startswith("schedule.warmup_epochs: 0, but the lr is scaled 8x to 0.08")


# ------------------------------------------------------------------------------------ kernels and processes
def test_fused_sgd_matches_the_default_implementation_on_cpu():
    from pipeline.models import build_model

    config = load_config(ROOT / "configs/imagenet_bn.yaml")  # Nesterov, per-group decay and lr
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = build_model("googlenet_bn", 5, aux_logits=False)
        optimizer = build_optimizer(model, 0.1, config.optim, fused=fused)
        assert optimizer.defaults["fused"] is (True if fused else None)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            images = torch.randn(4, 3, 64, 64, generator=generator)
            labels = torch.randint(0, 5, (4,), generator=generator)
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append(model.state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_ema_warm_up_follows_the_weights_then_decays_as_asked():
    from torch.optim.swa_utils import AveragedModel

    from pipeline.train.ema import update_ema

    model = torch.nn.Linear(1, 1, bias=False)
    warmed, cold = (AveragedModel(model, use_buffers=True) for _ in range(2))
    for step in range(1, 201):
        model.weight.data.fill_(float(step))  # the weights move on; the first ones are far behind
        update_ema(warmed, model, decay=0.999)
        update_ema(cold, model, decay=0.999, warmup=False)
    # without the warm-up the average still holds ~80% of the early weights; with it, it follows
    assert cold.module.weight.item() < 30
    assert warmed.module.weight.item() > 150
    # (1 + n) / (10 + n) reaches 0.999 after ~9,000 averages: from then on the decay asked for
    late = AveragedModel(model, use_buffers=True)
    late.n_averaged.fill_(20_000)
    late.module.weight.data.fill_(0.0)
    model.weight.data.fill_(1.0)
    update_ema(late, model, decay=0.999)
    assert late.module.weight.item() == pytest.approx(0.001)


def test_the_in_memory_loader_decodes_in_processes_not_forked_from_the_trainer():
    from pipeline.data.memory_input import decode_pool

    with decode_pool(1) as pool:
        assert pool.apply(os.getppid) != os.getpid()  # started by a fork server, not by fork()


def test_checkpoint_keys_of_earlier_versions_load():
    from pipeline.train.checkpoint import bare_keys

    weights = torch.ones(1)
    assert bare_keys({"module._orig_mod.fc.weight": weights, "_orig_mod.module.fc.bias": weights, "conv.w": weights}) \
        == {"fc.weight": weights, "fc.bias": weights, "conv.w": weights}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_compiled_run_resumes_eagerly(tiny_data, tmp_path):
    """On a GPU: fp16 with its GradScaler, compiled, then resumed without compiling."""
    args = [*TINY, "model.name=googlenet_bn", "train.mixed_precision=fp16", "model.compile_backend=aot_eager",
            f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=gpu", "schedule.epochs=2"]
    for extra in (["model.compile=true", "train.max_steps=12"], ["model.compile=false"]):
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, *extra], cwd=tmp_path,
                                env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stderr and "on cuda" in result.stderr
    model_keys, _ = checkpoint_keys(tmp_path / "gpu")
    assert not any("module." in k or "_orig_mod" in k for k in model_keys)
    assert [r["epoch"] for r in metrics(tmp_path / "gpu")] == [1, 2]
