"""The trainer, run for real: ``accelerate launch`` with 2 gloo processes on CPU, two "nodes" on
one host, TensorBoard read back with tensorboard's own reader (faults: test_faults.py)."""
from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, subprocess_env
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.config import ConfigError, load_config
from pipeline.train.metrics import Tally, topk_correct
from pipeline.train.run import build_network

# A small, fast recipe on the tiny dataset (4 classes, 96 training images).
TINY = ["model.name=googlenet", "data.image_size=32", "data.batch_size=4", "data.workers=1",
        "data.shuffle_buffer=8", "schedule.name=cosine", "schedule.warmup_epochs=0.5", "optim.lr=0.01",
        "train.log_every_steps=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int, *args: str, machines: int = 1, machine_rank: int = 0, port: int | None = None) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", str(machines), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        command += ["--multi_gpu"]
    if machines > 1:
        command += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    command += ["--main_process_port", str(port or free_port()), str(ROOT / "train.py"), "--config", str(ROOT / "configs/default.yaml")]
    return command + list(args)


def launch(processes: int, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(launch_command(processes, *args), cwd=cwd, env=subprocess_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(newest / "model.safetensors")


def test_topk_error_on_known_logits():
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],   # label 0: top-1
                           [0.1, 0.9, 0.5, 0.4, 0.3, 0.2, 0.0],   # label 6: outside the top-5
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.6, 0.0]])  # label 3: 5th -> top-5 only
    labels = torch.tensor([0, 6, 3])
    assert topk_correct(logits, labels).tolist() == [1, 2]
    tally = Tally()
    tally.add(logits, labels, torch.tensor(3.0))
    tally.add(logits[:1], labels[:1], torch.tensor(1.0))
    errors = tally.errors()
    assert errors["top1_error"] == pytest.approx(0.5) and errors["top5_error"] == pytest.approx(0.25)
    assert errors["loss"] == pytest.approx(1.0) and tally.count == 4


@pytest.mark.slow
def test_config_overrides_and_errors(tiny_data, tmp_path):
    config = load_config(ROOT / "configs/default.yaml", ["optim.lr=0.02", "data.batch_size=64", "data.augment.brightness=null"])
    assert (config.optim.lr, config.data.batch_size, config.data.augment.brightness) == (0.02, 64, None)
    for overrides, message in [
        (["optim.lrr=1"], "unknown key 'optim.lrr'"),
        (["optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
        (["data.batch_size=0"], "data.batch_size: 0 is out of range"),
        (["data.augment.crop_area=[0.5, 0.1]"], "data.augment.crop_area"),
        (["schedule.name=linear"], "schedule.name: 'linear' is out of range"),
        (["train.mixed_precision=fp8"], "train.mixed_precision"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
            load_config(ROOT / "configs/default.yaml", overrides)
    (tmp_path / "bad.yaml").write_text("model:\n  name: googlenet\n  auxx: true\n")
    with pytest.raises(ConfigError, match="unknown key 'model.auxx'"):
        load_config(tmp_path / "bad.yaml")
    # through the real command line: one line naming the path, exit code 2, nothing started
    missing = tmp_path / "no-such-shards"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), f"data.dir={missing}", f"output_dir={tmp_path}"],
                            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"error: data.dir: {missing}/manifest.json: no manifest" in result.stderr
    assert not (tmp_path / "demo").exists()


def test_scientific_notation_and_cpu_only_settings():
    assert load_config(None, ["optim.lr=1e-3", "optim.weight_decay=5e-5"]).optim.lr == 0.001
    from pipeline.ops.launch import make_accelerator

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
            make_accelerator(load_config(None, ["train.mixed_precision=fp16"]))


@pytest.mark.slow
def test_resume_with_another_batch_layout_is_refused(tiny_data, tmp_path):
    common = [sys.executable, str(ROOT / "train.py"), *TINY, f"data.dir={tiny_data}", f"output_dir={tmp_path}",
              "name=layout", "train.max_steps=2"]
    first = subprocess.run(common, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(common + ["data.batch_size=2"], cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert "step-00000002 was written with another batch layout or schedule (batch_size: 4 -> 2" in second.stderr
    assert load_config(tmp_path / "layout" / "config.yaml").data.batch_size == 4  # the original stays


def test_every_recipe_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.slow
def test_two_processes_train_together_and_log_to_tensorboard(tiny_data, tmp_path):
    result = launch(2, *TINY, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=ddp",
                    "schedule.epochs=2", "ema.enabled=true", cwd=tmp_path)
    run_dir = tmp_path / "ddp"
    assert "2 processes on cpu" in result.stderr
    assert "parameters identical on all 2 processes" in result.stderr
    assert "Traceback" not in result.stderr
    assert "validation top-1/top-5 error" in result.stderr.split("done in ")[1]
    records = metrics(run_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    updates_per_epoch = 96 // (4 * 2)
    assert [r["step"] for r in records] == [updates_per_epoch, 2 * updates_per_epoch]
    for r in records:
        assert r["val_samples"] == 16  # uneven shards (5, 5, 5, 1) over 2 processes x 1 worker
        assert 0 <= r["val_top5_error"] <= r["val_top1_error"] <= 1 and "ema_val_top1_error" in r
    tags = scalars(run_dir)
    for tag in ["train/loss", "train/loss_aux1", "train/loss_aux2", "train/top1_error", "train/top5_error",
                "val/top1_error", "val/top5_error", "val_ema/top1_error", "val_ema/top5_error", "lr",
                "throughput/images_per_sec", "throughput/data_wait_fraction"]:
        assert tag in tags, tag
    assert [s for s, _ in tags["val/top1_error"]] == [12, 24]
    assert tags["val/top1_error"][-1][1] == pytest.approx(records[-1]["val_top1_error"])
    # the logged lr is the schedule's value after each logged update: 0.01 x 8/32 (linear scaling
    # to 2 x 4 images), half an epoch (6 updates) of warm-up from 0.1x, then cosine to 0 at update 24
    peak = 0.01 * 8 / 32
    for step, lr in tags["lr"]:
        expected = peak * (0.1 + 0.9 * step / 6) if step < 6 else peak * (1 + math.cos(math.pi * (step - 6) / 18)) / 2
        assert lr == pytest.approx(expected, rel=1e-5, abs=1e-9), step
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert len(events.Images("train/augmented_images")) == 2  # one grid per epoch
    assert "config/text_summary" in events.Tags()["tensors"]
    assert (run_dir / "config.yaml").is_file()
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    for kind, key in (("model", "val_top1_error"), ("ema", "ema_val_top1_error")):  # the best of each
        winner = min(records, key=lambda r: r[key])  # the first of equals, as the trainer keeps it
        assert best[kind]["step"] == winner["step"] and best[kind]["val_top1_error"] == pytest.approx(winner[key])
        assert (run_dir / "checkpoints" / best[kind]["checkpoint"] / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_machines_on_one_host_form_one_group(tiny_data, tmp_path):
    port = free_port()
    args = [*TINY, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=nodes", "train.max_steps=3"]
    procs = [
        subprocess.Popen(launch_command(2, *args, machines=2, machine_rank=rank, port=port), cwd=tmp_path,
                         env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 processes on cpu" in outputs[0] and "parameters identical on all 2 processes" in outputs[0]
    assert metrics(tmp_path / "nodes")[-1]["step"] == 3


def start_single(*args: str, cwd: Path) -> subprocess.Popen:
    """``python train.py`` as one process (no launcher), started without waiting for it."""
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    _, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-4000:]
    return stderr


@pytest.mark.slow
def test_lr_and_ema_decay_follow_the_number_of_processes(tiny_data, tmp_path):
    """The same recipe and per-process batch on 1 and 2 processes: the lr doubles (linear
    scaling) and the EMA's per-update decay is squared (the same horizon in images)."""
    args = [*TINY, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "train.max_steps=1", "ema.enabled=true",
            "ema.horizon_epochs=1", "train.image_grid=false"]
    single = start_single(*args, "name=one", cwd=tmp_path)
    launch(2, *args, "name=two", cwd=tmp_path)
    stderr = finish(single)
    assert "lr 0.00125 (optim.lr 0.01 at 32 images, linear scaling to 4)" in stderr
    one, two = scalars(tmp_path / "one"), scalars(tmp_path / "two")
    assert one["recipe/lr"][0][1] == pytest.approx(0.01 * 4 / 32, rel=1e-6)
    assert two["recipe/lr"][0][1] == pytest.approx(2 * one["recipe/lr"][0][1], rel=1e-6)
    assert one["recipe/ema_decay"][0][1] == pytest.approx(math.exp(-4 / 96), rel=1e-6)  # 96 images an epoch
    assert two["recipe/ema_decay"][0][1] == pytest.approx(one["recipe/ema_decay"][0][1] ** 2, rel=1e-6)


# No dropout and no auxiliary heads, so that two runs differ only in what a test changes.
EXACT = ["model.aux_logits=false", "model.dropout=0", "train.image_grid=false", "train.log_every_steps=1"]


@pytest.mark.slow
def test_gradient_accumulation_with_no_sync_equals_the_larger_batch(tiny_data, tmp_path):
    """2 processes x 4 images x 2 accumulated micro-batches (the first without DDP's all-reduce)
    train the same weights as 2 processes x 8 images: each rank reads the same samples either way."""
    args = [*TINY, *EXACT, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "train.max_steps=3"]
    launch(2, *args, "data.batch_size=4", "optim.grad_accum=2", "name=accumulated", cwd=tmp_path)
    launch(2, *args, "data.batch_size=8", "name=large", cwd=tmp_path)
    accumulated, large = final_weights(tmp_path / "accumulated"), final_weights(tmp_path / "large")
    initial = build_network(load_config(tmp_path / "large" / "config.yaml"), 4).state_dict()
    for name in large:
        assert not torch.equal(large[name], initial[name]), f"{name} did not train"
        torch.testing.assert_close(accumulated[name], large[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_clipping_bf16_and_channels_last_against_a_reference_step(tiny_data, tmp_path):
    """One update from the same initial weights. fp32 with clipping is the reference: momentum
    starts from the gradient and there is no weight decay, so the update is lr x the clipped
    gradient, whose norm is exactly lr x clip_grad_norm. channels_last must give the same update;
    bf16 autocast a close but not identical one."""
    # An update large enough to stand out of float32 rounding of the weights (about 6M of them).
    clip = 1e-2
    args = [*TINY, *EXACT, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "train.max_steps=1", "optim.lr=1.0",
            "optim.weight_decay=0", f"optim.clip_grad_norm={clip}", "schedule.name=constant", "schedule.warmup_epochs=0"]
    variants = {"fp32": [], "bf16": ["train.mixed_precision=bf16"], "channels_last": ["model.channels_last=true"]}
    procs = {name: start_single(*args, *extra, f"name={name}", cwd=tmp_path) for name, extra in variants.items()}
    for proc in procs.values():
        finish(proc)
    initial = build_network(load_config(tmp_path / "fp32" / "config.yaml"), 4).state_dict()

    def update(name: str) -> torch.Tensor:
        weights = final_weights(tmp_path / name)
        return torch.cat([(weights[k].float() - initial[k].float()).flatten() for k in sorted(initial)])

    reference, bf16, channels_last = update("fp32"), update("bf16"), update("channels_last")
    lr = 1.0 * 4 / 32
    assert reference.norm().item() == pytest.approx(lr * clip, rel=1e-3)
    torch.testing.assert_close(channels_last, reference, rtol=1e-3, atol=lr * clip * 1e-3)
    # in float64: over ~6M terms float32's cosine strays past 1 by ~1e-4
    cosine = torch.nn.functional.cosine_similarity(bf16.double(), reference.double(), dim=0).item()
    differs = (bf16 - reference).norm().item() / reference.norm().item()
    assert cosine > 0.98 and differs > 1e-3, (cosine, differs)  # here: 0.9997 and 2.4e-2
    assert bf16.norm().item() == pytest.approx(lr * clip, rel=1e-2)


SKIPPED_STEP_SCRIPT = """
import json, sys, torch
from pipeline.train import tracking
from pipeline.config import load_config
from pipeline.data.prepared import open_prepared
from pipeline.train.run import build_run
from pipeline.train.trainer import train_one_epoch

config = load_config(None, sys.argv[1:])
run = build_run(config, open_prepared(config.data.dir))
# fp16 on a GPU gives Accelerate a GradScaler; on the CPU, torch's CPU GradScaler stands in.
from accelerate.optimizer import AcceleratedOptimizer
run.accelerator.scaler = torch.amp.GradScaler("cpu")
sgd = run.optimizer.optimizer  # as build_run makes it under fp16: not fused (fused SGD skips inside its kernel)
sgd._step_supports_amp_scaling = False
for group in sgd.param_groups:
    group["fused"] = False
run.optimizer = AcceleratedOptimizer(sgd, device_placement=False, scaler=run.accelerator.scaler)
poisoned_step = 2
run.bare_model().register_forward_pre_hook(
    lambda module, inputs: (inputs[0] * float("inf"),) if run.progress.step == poisoned_step else None)
(run.run_dir / "checkpoints").mkdir(parents=True)
tracking.start_tracking(run.accelerator, run.run_dir, 0, "")
train_one_epoch(run, 0, tracker=None)
print(json.dumps({"step": run.progress.step, "skipped": run.progress.skipped_steps,
                  "averaged": int(run.ema.n_averaged), "scheduled": run.scheduler.last_epoch}))
"""


def test_a_step_the_grad_scaler_skips_is_counted_and_not_averaged(tiny_data, tmp_path):
    updates = 4
    args = [*TINY, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=skip", f"train.max_steps={updates}",
            "ema.enabled=true", "train.image_grid=false", "data.workers=0"]
    result = subprocess.run([sys.executable, "-c", SKIPPED_STEP_SCRIPT, *args], cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    # every update consumed its batch and advanced the schedule; the overflowing one was not averaged
    assert outcome == {"step": updates, "skipped": 1, "averaged": updates - 1, "scheduled": updates}


@pytest.mark.slow
def test_baked_copies_train_one_pass_per_epoch(baked_data, tmp_path):
    """Baked copies through the real trainer: an epoch is one pass over the 32 source images, not
    over the 96 baked samples (which copy each epoch reads is checked by key in test_data)."""
    args = [*TINY, f"data.dir={baked_data}", "schedule.epochs=3", "train.image_grid=false", "data.batch_size=4"]
    result = launch(2, *args, f"output_dir={tmp_path}", "name=baked", cwd=tmp_path)
    assert "4 updates per epoch of 8 images, 12 updates in all" in result.stderr
    records = metrics(tmp_path / "baked")
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 4), (2, 8), (3, 12)]
    assert all(r["val_samples"] == 4 for r in records)
    assert [s for s, _ in scalars(tmp_path / "baked")["train/loss"]] == list(range(2, 13, 2))
