"""What keeps the training step at the device's speed, held on the CPU where it can be: the fused
photometric distortion equals the reference one for the same draws, the update loop reads
nothing back from tensors between log lines (no host-device synchronisation), the stop
signal is agreed on without waiting and alike on every rank. The GPU-only settings have tests
that skip without CUDA (their speed is measured by benchmarks/bench_train.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, subprocess_env

from imaging.photometric import BLEND_COLUMNS, blend_params, distort_normalize, normalize, photometric_distort
from imaging.specs import IMAGENET_MEAN, IMAGENET_STD, PhotometricSpec
from pipeline.data.device_augment import DeviceInput


def cuda(test):
    """Needs a CUDA GPU: marked ``cuda`` (``pytest -m cuda`` runs these), skipped without one."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
SPECS = [PhotometricSpec(lighting_std=0.1), PhotometricSpec(), PhotometricSpec(random_order=False),
         PhotometricSpec(brightness=None, saturation=(0.0, 2.0)), PhotometricSpec(None, None, None, lighting_std=0.2)]


def loader_batch(n: int = 12, h: int = 10, w: int = 14, seed: int = 0) -> torch.Tensor:
    """uint8 [N,3,H,W] as the loader hands it over: a channels_last view of HWC pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------ fused distortion
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_fused_distortion_equals_the_reference_for_the_same_draws(spec, layout):
    images = loader_batch()
    if layout == "contiguous":
        images = images.contiguous()
    reference = normalize(photometric_distort(images, spec, torch.Generator().manual_seed(5)))
    params = blend_params(len(images), spec, torch.Generator().manual_seed(5))
    fused = distort_normalize(images, params, MEAN, STD)
    assert fused.is_contiguous(memory_format=torch.channels_last) and fused.dtype == torch.float32
    torch.testing.assert_close(fused, reference, atol=1e-6, rtol=0)


def test_fused_distortion_draws_differ_per_image_and_follow_the_generator():
    spec = PhotometricSpec(lighting_std=0.1)
    a = blend_params(64, spec, torch.Generator().manual_seed(1))
    b = blend_params(64, spec, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (64, BLEND_COLUMNS)
    assert len(set(a[:, 0].tolist())) == 64  # the factor at position 0 differs per image
    # every image has one contrast and one saturation position, and all orders occur
    assert torch.equal(a[:, 3:6].sum(1), torch.ones(64)) and torch.equal(a[:, 6:9].sum(1), torch.ones(64))
    orders = {tuple(row) for row in (a[:, 3:6] + 2 * a[:, 6:9]).tolist()}
    assert len(orders) == 6


def test_device_input_gives_the_compute_dtype_and_memory_format():
    images = loader_batch()
    spec = PhotometricSpec()
    bf16 = DeviceInput("cpu", channels_last=True, mixed_precision="bf16", photometric=spec)
    out = bf16(images, torch.Generator().manual_seed(2))
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    reference = normalize(photometric_distort(images, spec, torch.Generator().manual_seed(2)))
    torch.testing.assert_close(out.float(), reference, atol=0.02, rtol=0.01)  # bf16 rounding only
    nchw = DeviceInput("cpu", channels_last=False)
    plain = nchw(images, distort=True)  # no photometric spec: normalised only
    assert plain.dtype == torch.float32 and plain.is_contiguous()
    torch.testing.assert_close(plain, normalize(images.float() / 255), atol=1e-6, rtol=0)
    assert torch.equal(bf16(images, distort=False).float(), plain.bfloat16().float())


# ------------------------------------------------------------------------------ host reads per update
COUNT_SCRIPT = """
import json, sys, torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from test_host_sync import host_read, python_caller
from imaging.specs import PhotometricSpec
from pipeline.train import tracking
from pipeline.config import load_config
from pipeline.data.prepared import open_prepared
from pipeline.data.device_augment import DeviceInput
from pipeline.train.run import build_run
from pipeline.train.trainer import train_one_epoch

# Reading a tensor's value on the host: on a GPU, each waits for the device to catch up. Seen as
# Python calls here (on the CPU some, e.g. .tolist(), dispatch no op) and as ops below (those made
# inside torch too).
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
              torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
              torch.Tensor.cpu, torch.Tensor.numpy}
ALLOWED = {"log_window": "log", "end_epoch": "epoch end", "save_checkpoint": "epoch end", "_read_pending": "poll"}


# (step, kind, where) of a read called from ``frame``: an allowed place, the loader, or the update.
def attribute(run, frame):
    caller, names, files = frame, [], []
    while frame is not None:
        names.append(frame.f_code.co_name)
        files.append(frame.f_code.co_filename)
        frame = frame.f_back
    kind = next((ALLOWED[n] for n in names if n in ALLOWED), None)
    if kind is None and any(f.endswith("torch/utils/data/dataloader.py") for f in files):
        kind = "loader"  # the host's own work, e.g. the seed a new loader iterator draws
    return run.progress.step, kind or "step", kind or python_caller(caller)


class PythonReads(TorchFunctionMode):
    def __init__(self, run):
        super().__init__()
        self.run, self.calls = run, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.calls.append(attribute(self.run, sys._getframe(1)))
        return func(*args, **(kwargs or {}))


class OpReads(TorchDispatchMode):
    def __init__(self, run):
        super().__init__()
        self.run, self.calls = run, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if host_read(func, args, kwargs):
            self.calls.append(attribute(self.run, sys._getframe(1)))
        return func(*args, **kwargs)


config = load_config(None, sys.argv[1:])
run = build_run(config, open_prepared(config.data.dir))
# Distort on the device, as on a GPU (a CPU run does it in the loader workers).
run.device_input = DeviceInput(run.accelerator.device, channels_last=True, photometric=PhotometricSpec(lighting_std=0.1))
(run.run_dir / "checkpoints").mkdir(parents=True)
tracking.start_tracking(run.accelerator, run.run_dir, 0, "")
calls, ops = PythonReads(run), OpReads(run)
with calls, ops:
    train_one_epoch(run, 0, tracker=None)
print(json.dumps({"steps": run.progress.step, "calls": calls.calls, "ops": ops.calls}))
"""


@pytest.mark.slow
def test_the_update_loop_reads_no_tensor_on_the_host_between_log_lines(tiny_data, tmp_path):
    """Every call, and every op, that reads a tensor's value on the host during an epoch of 12
    updates, with the distortion on the device and the EMA on: none in the updates themselves
    (the EMA's included); the stop flag is read at every poll (its value was reduced ``every``
    steps earlier), the rest at the loader's start, the log line and the epoch end.
    ``tests/test_host_sync.py`` checks the ops of an update in more settings."""
    every, ema_every, updates = 3, 4, 12
    args = ["model.name=googlenet", "data.image_size=32", "data.batch_size=4", "data.workers=1",
            "data.shuffle_buffer=8", f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=count",
            f"train.max_steps={updates}", "train.log_every_steps=1000", "train.image_grid=false",
            f"train.preemption_poll_steps={every}", "ema.enabled=true", f"ema.every={ema_every}"]
    env = subprocess_env()
    env["PYTHONPATH"] = str(ROOT / "tests") + os.pathsep + env["PYTHONPATH"]  # test_host_sync's guard
    result = subprocess.run([sys.executable, "-c", COUNT_SCRIPT, *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["steps"] == updates
    polls = list(range(2 * every, updates, every))  # the first poll only starts a reduce; none at the end
    for seen in ("calls", "ops"):
        reads = outcome[seen]
        in_steps = [(step, where) for step, kind, where in reads if kind == "step"]
        assert in_steps == [], f"host reads inside the update ({seen}): {in_steps}"
        assert [step for step, kind, _ in reads if kind == "poll"] == polls, seen  # the instrument sees reads
        assert all(step == updates for step, kind, _ in reads if kind in ("log", "epoch end"))
        assert all(step == 0 for step, kind, _ in reads if kind == "loader")  # at the epoch's start only
    assert any(kind == "log" for _, kind, _ in outcome["calls"])


def test_the_ema_update_is_averagedmodels_without_host_reads():
    from test_host_sync import HostReads
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from pipeline.models import build_model
    from pipeline.train.ema import update_ema

    torch.manual_seed(0)
    model = build_model("googlenet_bn", 5)  # batch norm: integer buffers too
    decay = 0.9
    reference, ours = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
                       for _ in range(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = HostReads()
    for _ in range(3):
        model(torch.randn(2, 3, 64, 64)).logits.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        reference.update_parameters(model)
        with guard:
            update_ema(ours, model, decay, warmup=False)
    assert guard.reads == []
    expected, got = reference.state_dict(), ours.state_dict()
    assert int(got["n_averaged"]) == 3 and not torch.equal(got["module.fc.weight"], model.fc.weight)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


# ------------------------------------------------------------------------------ preemption poll
class OneProcess:
    """What PreemptionWatch needs of an Accelerator, for one process on the CPU."""
    device = torch.device("cpu")
    num_processes = 1

    @staticmethod
    def reduce(tensor, reduction):
        return tensor  # over one process


def test_poll_answers_one_poll_after_the_signal_and_only_at_poll_steps():
    from pipeline.ops.preemption import REQUEUE, STOP, PreemptionWatch

    watch, acc = PreemptionWatch(), OneProcess()
    answers = {}
    for step in range(1, 31):
        if step == 7:
            watch.asked = STOP  # what the handler sets
        if step == 14:
            watch.asked = REQUEUE
        answers[step] = watch.poll(acc, step, every=5)
    assert {s: a for s, a in answers.items() if a} == {15: STOP, 20: REQUEUE, 25: REQUEUE, 30: REQUEUE}
    assert watch.should_stop(acc) == REQUEUE


# ------------------------------------------------------------------------------ GPU only
@cuda
def test_cuda_device_input_needs_no_synchronisation():
    images = loader_batch(64, 224, 224).pin_memory()
    device_input = DeviceInput("cuda", channels_last=True, mixed_precision="bf16", photometric=PhotometricSpec())
    device_input(images, torch.Generator().manual_seed(0))  # first call: allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = device_input(images, torch.Generator().manual_seed(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = DeviceInput("cpu", channels_last=True, mixed_precision="bf16", photometric=PhotometricSpec())
    reference = cpu(images, torch.Generator().manual_seed(1))
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.cpu().float(), reference.float(), atol=0.02, rtol=0.01)


@cuda
def test_cuda_compiled_device_input_equals_eager():
    images = loader_batch(16, 64, 64).cuda()
    eager = DeviceInput("cuda", channels_last=True, mixed_precision="bf16", photometric=PhotometricSpec())
    compiled = DeviceInput("cuda", channels_last=True, mixed_precision="bf16", photometric=PhotometricSpec(),
                           compile_mode="default")
    a = eager(images, torch.Generator().manual_seed(3)).float()
    b = compiled(images, torch.Generator().manual_seed(3)).float()
    torch.testing.assert_close(a, b, atol=0.02, rtol=0.01)


@cuda
def test_cuda_training_uses_fused_sgd_cudnn_benchmark_and_compile(tiny_data, tmp_path):
    script = """
import sys, torch
from pipeline.config import load_config
from pipeline.data.prepared import open_prepared
from pipeline.train.run import build_run
config = load_config(None, sys.argv[1:])
run = build_run(config, open_prepared(config.data.dir))
group = run.optimizer.optimizer.param_groups[0]
from imaging.photometric import distort_normalize
print(group["fused"], torch.backends.cudnn.benchmark, type(run.model).__name__,
      run.device_input.transform is not distort_normalize)  # compiled
"""
    args = ["model.name=googlenet_bn", "data.image_size=32", "data.batch_size=4", "data.workers=0",
            f"data.dir={tiny_data}", f"output_dir={tmp_path}", "model.compile=true"]
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split()[-4:] == ["True", "True", "OptimizedModule", "True"]


def test_new_settings_are_checked_and_named():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.compile_mode: 'fastest' is out of range"):
        load_config(None, ["model.compile_mode=fastest"])
    with pytest.raises(ConfigError, match="train.preemption_poll_steps: 0 is out of range"):
        load_config(None, ["train.preemption_poll_steps=0"])
    for recipe in ("imagenet_bn", "imagenet_paper"):  # the GPU recipes compile and average every 32 updates
        config = load_config(ROOT / "configs" / f"{recipe}.yaml")
        assert config.model.compile and config.ema.every == 32
