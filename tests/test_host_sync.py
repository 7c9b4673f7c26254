"""No host reads inside an update, checked where torch dispatches every op (``TorchDispatchMode``),
so that reads made inside torch (a 0-dim tensor turned into a Python scalar, GradScaler's checks)
count as much as our own ``.item()``: whole updates as ``train_one_epoch`` runs them (input
transform, forward and loss of every head, backward, gradient clipping, optimizer step and
schedule, EMA, metric sums), for both networks, with and without the EMA and fp16's GradScaler.

On the CPU every tensor is on the host, so what would make the host wait for a GPU shows as an op
that turns a tensor into a Python value (``aten._local_scalar_dense``: ``.item()``, ``bool()``,
``float()``, ``int()``) or whose output size depends on the values (``nonzero``, boolean
masks). Copies from a non-CPU device to the CPU are caught too, so that the guard also holds on a
GPU. ``tests/test_speed.py`` runs the trainer's own epoch loop under this guard as well.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

from imaging.specs import PhotometricSpec
from pipeline.config import load_config
from pipeline.data.device_augment import DeviceInput
from pipeline.data.prepared import IGNORE_LABEL
from pipeline.ops.launch import make_accelerator
from pipeline.train.ema import update_ema
from pipeline.train.metrics import Tally
from pipeline.train.recipe import build_optimizer, ema_decay, layout_for, scaled_lr
from pipeline.train.run import build_network
from pipeline.train.schedule import build_scheduler
from pipeline.train.step import compute_loss, optimizer_step
from pipeline.train.tracking import LogWindow

aten = torch.ops.aten
SCALAR_READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}
VALUE_SIZED = {aten.nonzero.default, aten.masked_select.default}  # the host waits for the size
MASKABLE = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}  # with a boolean mask: the same


def host_read(func, args, kwargs) -> bool:
    """Whether this op makes the host wait for the device it runs on."""
    if func in SCALAR_READS or func in VALUE_SIZED:
        return True
    if func in MASKABLE:
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    if func is aten._to_copy.default:  # .to("cpu"), .cpu(), .tolist() of a device tensor
        target = kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"
    if func is aten.copy_.default:  # a CPU tensor filled from a device tensor
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


PROJECT_PACKAGES = {"pipeline", "imaging", "shards", "data_prep"}
WRAPPERS = {"_python_dispatch.py", "_compile.py", "eval_frame.py", "_contextlib.py"}  # torch's, around a call
MODES = {"__torch_function__", "__torch_dispatch__"}


def python_caller(frame) -> str:
    """Where a call from ``frame`` came from: the innermost Python frame past torch's wrappers and
    any mode, and the innermost of the project's."""
    inner, ours = None, None
    while frame is not None and ours is None:
        path, name = Path(frame.f_code.co_filename), frame.f_code.co_name
        if path.name not in WRAPPERS and name not in MODES:
            project = path.is_relative_to(ROOT) and path.relative_to(ROOT).parts[0] in PROJECT_PACKAGES
            shown = path.relative_to(ROOT) if project else f"{path.parent.name}/{path.name}"
            place = f"{shown}:{frame.f_lineno} {frame.f_code.co_qualname}"
            inner = inner or place
            ours = place if project else None
        frame = frame.f_back
    return inner if ours in (None, inner) else f"{inner} <- {ours}"


class HostReads(TorchDispatchMode):
    """Records every op that reads a tensor on the host (``reads``: op and caller), and which ops
    ran (``seen``: their names), so that a test can tell it saw the whole update."""

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, str]] = []
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen.add(func.__name__.split(".")[0])
        if host_read(func, args, kwargs):
            self.reads.append((str(func), python_caller(sys._getframe(1))))
        return func(*args, **kwargs)


# torch's GradScaler steps an optimizer that cannot take its inf/nan flag (the unfused SGD of fp16
# runs, see build_run) only after reading that flag on the host (torch/amp/grad_scaler.py,
# GradScaler._maybe_opt_step): one read per update, which on a GPU waits for the backward.
# docs/performance.md says so; the test counts these reads apart from the rest.
SCALER_FLAG_READ = " GradScaler._maybe_opt_step."  # (its generator expression)


class Update:
    """The objects of an update as ``build_run`` makes them, and ``run``: updates as
    ``train_one_epoch`` does them (one micro-batch each). ``fp16``: the unfused SGD stepped through
    Accelerate's GradScaler, given to it (on a CPU, where the trainer refuses fp16, Accelerate
    makes none, and the forward stays in float32)."""

    def __init__(self, model_name: str, ema: bool, fp16: bool, tmp_path: Path, size: int = 64, batch: int = 2):
        on_gpu = torch.cuda.is_available()
        self.config = c = load_config(None, [
            f"model.name={model_name}", f"data.image_size={size}", f"data.batch_size={batch}",
            f"ema.enabled={ema}", "ema.every=1", "optim.clip_grad_norm=5.0", "optim.label_smoothing=0.1",
            "model.channels_last=true", f"train.mixed_precision={'fp16' if fp16 and on_gpu else 'no'}",
            f"output_dir={tmp_path}", "name=host-sync"])
        self.size, self.batch = size, batch
        self.accelerator = acc = make_accelerator(c)
        if fp16:  # before prepare, so that the optimizer steps through it; a first scale at which
            # no update of these batches overflows, so that each is applied (and averaged)
            acc.scaler = torch.amp.GradScaler(acc.device.type, init_scale=2.0**8)
        layout = layout_for(c, acc.num_processes, 16 * batch)
        model = build_network(c, num_classes=5)
        optimizer = build_optimizer(model, scaled_lr(c.optim, layout.images_per_update), c.optim, fused=not fp16)
        self.scheduler = build_scheduler(optimizer, c.schedule, layout.updates_per_epoch)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.bare = acc.unwrap_model(self.model, keep_torch_compile=False)
        self.ema, self.decay = None, ema_decay(c.ema, layout.images_per_update, layout.epoch_images)
        if ema:
            self.ema = AveragedModel(self.bare, device=acc.device, multi_avg_fn=get_ema_multi_avg_fn(self.decay),
                                     use_buffers=True)
        self.device_input = DeviceInput(acc.device, channels_last=True, mixed_precision=c.train.mixed_precision,
                                        photometric=PhotometricSpec(lighting_std=0.1))
        self.epoch_tally, self.window = Tally(), LogWindow()
        self.applied = 0
        self.model.train()

    def batches(self, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 loader batches (channels_last views of HWC pixels) and labels; the first batch
        holds a skipped sample's slot."""
        g = torch.Generator().manual_seed(0)
        batches = []
        for i in range(count):
            images = torch.randint(0, 256, (self.batch, self.size, self.size, 3), dtype=torch.uint8, generator=g)
            labels = torch.randint(0, 5, (self.batch,), generator=g)
            labels[-1] = IGNORE_LABEL if i == 0 else labels[-1]
            batches.append((images.permute(0, 3, 1, 2), labels))
        return batches

    def run(self, batches) -> None:
        acc, c = self.accelerator, self.config
        for step, (images, labels) in enumerate(batches):
            inputs = self.device_input(images, torch.Generator().manual_seed(step))
            labels = labels.to(acc.device, non_blocking=True)
            with acc.autocast():
                loss, logits, losses = compute_loss(self.model, inputs, labels, c.model.aux_weight,
                                                    c.optim.label_smoothing)
            acc.backward(loss)
            labelled = labels.ne(IGNORE_LABEL).sum()
            counts = Tally.counts(logits.detach().float(), labels, losses[0] * labelled)
            self.epoch_tally.add_counts(counts)
            self.window.add(counts, losses, labels.numel())
            applied = optimizer_step(acc, self.model, self.optimizer, self.scheduler, c.optim.clip_grad_norm)
            self.applied += applied
            if self.ema is not None and applied:
                update_ema(self.ema, self.bare, self.decay, c.ema.warmup)


@pytest.fixture
def torch_threads():
    """torch's thread count as it was before the test (make_accelerator sets it)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16-scaled"])
@pytest.mark.parametrize("ema", [True, False], ids=["ema", "no-ema"])
@pytest.mark.parametrize("model_name", ["googlenet", "googlenet_bn"])
def test_whole_updates_read_nothing_on_the_host(model_name, ema, fp16, tmp_path, torch_threads):
    """Three updates from the very first: the first optimizer step (which makes the momentum
    buffers), the first average (a copy of the weights) and GradScaler's first scale are inside
    the guard too; the next two average with the warmed-up decay."""
    update, guard, updates = Update(model_name, ema, fp16, tmp_path), HostReads(), 3
    batches = update.batches(updates)
    # make_accelerator gave torch every core; on a busy machine each small op of a batch of 2
    # would wait for its slowest thread
    torch.set_num_threads(1)
    with guard:
        update.run(batches)
    scaler_reads = [read for read in guard.reads if SCALER_FLAG_READ in read[1]]
    ours = [read for read in guard.reads if read not in scaler_reads]
    assert ours == [], "host reads inside an update:\n" + "\n".join(f"{op} from {where}" for op, where in ours)
    assert len(scaler_reads) == (updates if fp16 else 0), scaler_reads
    # the guard saw the whole update: backward, the optimizer step (or GradScaler's unscale and
    # update around the unfused one), the metric sums, the EMA
    expected = {"convolution_backward", "topk", *(["_amp_foreach_non_finite_check_and_unscale_", "_amp_update_scale_"]
                                                    if fp16 else ["_fused_sgd_"])}
    assert expected <= guard.seen, expected - guard.seen
    if ema:
        assert "_foreach_lerp_" in guard.seen and update.applied == updates
        assert int(update.ema.n_averaged) == updates
        assert not torch.equal(update.ema.module.fc.weight, update.bare.fc.weight)  # averaged, not copied


def test_the_guard_sees_reads_inside_torch_and_copies_to_the_host():
    """What the EMA used to do (a 0-dim tensor weight becomes a Python scalar inside torch), a
    branch on a tensor, a boolean mask, and a copy off a device (the meta device stands in for a
    GPU: the copy is seen before it fails)."""
    weights, targets = [torch.zeros(3)], [torch.ones(3)]
    guard = HostReads()
    with guard:
        torch._foreach_lerp_(weights, targets, torch.tensor(0.5))
        assert bool(targets[0].sum() > 0)
        targets[0][targets[0] > 0].sum()
        torch._foreach_lerp_(weights, targets, [torch.tensor(0.5)])  # a list of tensor weights: no read
        with pytest.raises(NotImplementedError):
            torch.empty(2, device="meta").cpu()
    ops = [op for op, _ in guard.reads]
    assert ops == ["aten._local_scalar_dense.default", "aten._local_scalar_dense.default", "aten.index.Tensor",
                   "aten._to_copy.default"], guard.reads
    assert "test_host_sync.py" in guard.reads[0][1]
