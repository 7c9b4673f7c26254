"""What a recipe becomes at a given scale: schedules as functions of the update, lr scaling,
EMA decay from a horizon, parameter groups, best checkpoints per kind, fp16 skipped steps."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT

from pipeline.config import ConfigError, EmaConfig, OptimConfig, ScheduleConfig, load_config
from pipeline.inference.run_files import MODEL_FILE, pick_checkpoint
from pipeline.models import build_model
from pipeline.train.checkpoint import BEST_FILE, STATE_FILE, CheckpointManager
from pipeline.train.recipe import BatchLayout, ema_decay, param_groups, scaled_lr
from pipeline.train.schedule import build_scheduler
from pipeline.train.step import optimizer_step

LR = 0.8


def lrs_over_updates(cfg: ScheduleConfig, updates_per_epoch: int) -> list[float]:
    """The lr in force for updates 0 .. total (the last one: after the final step)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = build_scheduler(optimizer, cfg, updates_per_epoch)
    values = [optimizer.param_groups[0]["lr"]]
    for _ in range(cfg.epochs * updates_per_epoch):
        optimizer.step()
        scheduler.step()
        values.append(optimizer.param_groups[0]["lr"])
    return values


def test_step_schedule_is_the_papers_096_every_8_epochs():
    upe = 10
    got = lrs_over_updates(ScheduleConfig(name="step", epochs=40, step_epochs=8, gamma=0.96), upe)
    expected = [LR * 0.96 ** (u // (8 * upe)) for u in range(40 * upe + 1)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[8 * upe - 1] == LR and got[8 * upe] == pytest.approx(LR * 0.96)  # the drop is at epoch 8 exactly


def test_warmup_is_linear_then_the_main_schedule_starts_from_the_full_lr():
    upe, warm = 8, 2
    cfg = ScheduleConfig(name="step", epochs=20, warmup_epochs=warm, warmup_start_factor=0.1, step_epochs=5, gamma=0.5)
    got = lrs_over_updates(cfg, upe)
    w = warm * upe
    for u in range(w):
        assert got[u] == pytest.approx(LR * (0.1 + 0.9 * u / w), rel=1e-9), u
    for u in range(w, len(got)):  # the step schedule counts from the end of the warm-up
        assert got[u] == pytest.approx(LR * 0.5 ** ((u - w) // (5 * upe)), rel=1e-9), u


def test_cosine_ends_exactly_at_its_floor():
    upe, warm, floor = 7, 1, 0.01
    cfg = ScheduleConfig(name="cosine", epochs=12, warmup_epochs=warm, min_lr=floor)
    got = lrs_over_updates(cfg, upe)
    w, total = warm * upe, 12 * upe
    for u in range(w, total + 1):
        expected = floor + (LR - floor) * (1 + math.cos(math.pi * (u - w) / (total - w))) / 2
        assert got[u] == pytest.approx(expected, rel=1e-6, abs=1e-12), u
    assert got[-1] == pytest.approx(floor, rel=1e-9) and min(got) == pytest.approx(floor, rel=1e-9)


def test_poly_is_bvlc_quick_solver():
    upe = 5
    got = lrs_over_updates(ScheduleConfig(name="poly", epochs=6, power=0.5), upe)
    total = 6 * upe
    assert got == pytest.approx([LR * (1 - u / total) ** 0.5 for u in range(total + 1)], rel=1e-9, abs=1e-12)


def test_lr_follows_the_total_batch():
    optim = OptimConfig(lr=0.1, lr_base_batch=256, lr_scaling="linear")
    assert scaled_lr(optim, 256) == pytest.approx(0.1)
    assert scaled_lr(optim, 1024) == pytest.approx(0.4)  # 8 GPUs x 128
    assert scaled_lr(optim, 2 * 32 * 2) == pytest.approx(0.05)  # 2 processes x 32 x 2 accumulation
    optim.lr_scaling = "sqrt"
    assert scaled_lr(optim, 1024) == pytest.approx(0.2)
    optim.lr_scaling = "none"
    assert scaled_lr(optim, 1024) == pytest.approx(0.1)
    layout = BatchLayout(processes=4, batch_size=32, grad_accum=2, epoch_images=10_000, epochs=3)
    assert (layout.images_per_update, layout.updates_per_epoch, layout.batches_per_epoch) == (256, 39, 78)


def test_ema_horizon_is_the_same_in_images_at_any_scale():
    ema = EmaConfig(enabled=True, horizon_epochs=2.0)
    epoch = 1_281_167
    one_gpu = ema_decay(ema, 256, epoch)
    assert one_gpu == pytest.approx(0.9999, abs=2e-6)  # the paper recipe's former per-update value
    # 8x the batch: one update must forget as much as 8 small ones
    assert ema_decay(ema, 2048, epoch) == pytest.approx(one_gpu ** 8, rel=1e-12)
    ema.every = 4  # averaging every 4th update: each average step spans 4 updates
    assert ema_decay(ema, 256, epoch) == pytest.approx(one_gpu ** 4, rel=1e-12)
    # after one horizon of images the old average weighs 1/e, whatever the batch
    for batch in (32, 256, 4096):
        updates = 2 * epoch / (batch * ema.every)
        assert ema_decay(ema, batch, epoch) ** updates == pytest.approx(math.exp(-1), rel=1e-9)


def test_replaced_keys_and_values_name_their_replacement():
    with pytest.raises(ConfigError, match="ema.decay: replaced by ema.horizon_epochs"):
        load_config(None, ["ema.decay=0.9999"])
    with pytest.raises(ConfigError, match="'paper' is now 'step'"):
        load_config(None, ["schedule.name=paper"])
    with pytest.raises(ConfigError, match="optim.lr_scaling"):
        load_config(None, ["optim.lr_scaling=cubic"])


def test_paper_recipe_is_bvlc_solver():
    c = load_config(ROOT / "configs/imagenet_paper.yaml")
    assert (c.optim.lr, c.optim.lr_base_batch, c.optim.bias_lr_factor, c.optim.decay_bias_and_norm) == (0.01, 32, 2.0, False)
    assert (c.schedule.name, c.schedule.gamma, c.schedule.step_epochs, c.schedule.epochs) == ("step", 0.96, 8, 250)
    assert scaled_lr(c.optim, 8 * c.data.batch_size) == pytest.approx(0.08)
    model = build_model("googlenet", 10)
    groups = param_groups(model, 0.08, c.optim)
    weights, biases = groups
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    assert (weights["lr"], weights["weight_decay"]) == (0.08, 0.0002)
    assert (biases["lr"], biases["weight_decay"]) == (0.16, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".bias") for p in biases["params"])
    assert len(weights["params"]) + len(biases["params"]) == len(list(model.parameters()))


def test_batch_norm_scales_are_their_own_group():
    groups = param_groups(build_model("googlenet_bn", 10), 1.0,
                          OptimConfig(weight_decay=5e-5, decay_bias_and_norm=False, bias_lr_factor=1.0))
    assert [g["weight_decay"] for g in groups] == [5e-5, 0.0, 0.0] and [g["lr"] for g in groups] == [1.0] * 3


def fake_checkpoint(directory, step: int):
    path = directory / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / MODEL_FILE).write_bytes(b"")
    (path / STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def test_best_is_tracked_for_the_model_and_for_its_ema(tmp_path):
    (tmp_path / "config.yaml").write_text("")
    directory = tmp_path / "checkpoints"
    checkpoints = CheckpointManager(directory, SimpleNamespace(is_main_process=True), keep_last=1)
    second = fake_checkpoint(directory, 2)
    checkpoints.mark_best("model", second, 0.5, 2)
    fourth = fake_checkpoint(directory, 4)
    fake_checkpoint(directory, 6)
    checkpoints.mark_best("ema", fourth, 0.4, 4)  # and prunes to the last one, keeping both bests
    assert sorted(p.name for p in checkpoints.complete()) == ["step-00000002", "step-00000004", "step-00000006"]
    assert json.loads((directory / BEST_FILE).read_text())["ema"]["checkpoint"] == "step-00000004"
    assert pick_checkpoint(tmp_path, "best") == second
    assert pick_checkpoint(tmp_path, "best", ema=True) == fourth
    assert pick_checkpoint(tmp_path, "last", ema=True).name == "step-00000006"


def test_a_step_skipped_by_the_grad_scaler_changes_nothing_but_the_schedule():
    """fp16 on a GPU skips updates whose gradients overflow. The CPU has no fp16 autocast in
    Accelerate, so torch's own CPU GradScaler stands in for the scaler Accelerate would create."""
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    for inputs, should_apply in [(torch.full((3, 4), float("inf")), False), (torch.ones(3, 4), True)]:
        before = model.weight.detach().clone()
        accelerator.backward(model(inputs).sum())
        applied = optimizer_step(accelerator, model, optimizer, scheduler, clip_grad_norm=1.0)
        assert applied is should_apply
        assert torch.equal(model.weight, before) is not should_apply
    assert scheduler.last_epoch == 2 and optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
