"""Fine-tuning: a run trained on 4 classes starts another on 3 (fresh classifiers), frozen layers
stay as they were, the head's own lr, and evaluation, prediction and export of the result."""
from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from tiny_runs import run_module, train, train_process

from pipeline.config import ConfigError, load_config
from pipeline.models import classifier_layers
from pipeline.train.fine_tune import FrozenBatchNorm2d, load_start_weights, read_start_weights
from pipeline.train.recipe import build_optimizer, param_groups, scheduled_lr
from pipeline.train.run import build_network
from pipeline.train.saved_runs import RunError
from pipeline.train.schedule import build_scheduler

HEAD = ("fc.", "aux1.fc2.", "aux2.fc2.")


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory) -> Path:
    """Another dataset: 3 classes (other ids than tiny_data's), 48 training and 12 validation images."""
    from data_prep.plan import PrepParams
    from data_prep.synthetic import SyntheticSpec, generate
    from data_prep.writer import run

    root = tmp_path_factory.mktemp("three")
    images = root / "images"
    generate(images, SyntheticSpec(num_classes=3, train_per_class=16, val_per_class=4, min_side=40, max_side=72,
                                   seed=7))
    run(PrepParams(train=str(images / "train"), val=str(images / "val"), val_labels=str(images / "val_labels.txt"),
                   class_names=str(images / "LOC_synset_mapping.txt"), shard_size=8), root / "shards")
    return root / "shards"


@pytest.fixture(scope="module")
def runs(tiny_data, three_classes, tmp_path_factory) -> dict:
    """googlenet_bn trained on tiny_data (4 classes), then fine-tuned from a copy of it on
    three_classes with everything but the classifiers frozen and the head at 10x the lr: stopped
    after epoch 1, the copy deleted, and resumed (the start weights are not needed any more)."""
    root = tmp_path_factory.mktemp("fine-tune")
    source = train(tiny_data, root, "source", "model.name=googlenet_bn", "schedule.epochs=1",
                   "schedule.warmup_epochs=0")
    copy = shutil.copytree(source, root / "copy-of-source")
    tuning = ["model.name=googlenet_bn", f"model.weights={copy}", "model.freeze=all_but_head",
              "optim.head_lr_factor=10", "schedule.epochs=2"]
    first = train_process(three_classes, root, "tuned", *tuning, "train.max_steps=6")
    assert first.returncode == 0, first.stderr[-4000:]
    shutil.rmtree(copy)
    resumed = train_process(three_classes, root, "tuned", *tuning)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"model.weights: not read; the run resumes from its checkpoint ({copy} started it)" in resumed.stderr
    return {"root": root, "source": source, "copy": copy, "tuned": root / "tuned", "stderr": first.stderr}


def weights_of(run_dir: Path, step: str | None = None) -> dict[str, torch.Tensor]:
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    return load_file((run_dir / "checkpoints" / step if step else checkpoints[-1]) / "model.safetensors")


@pytest.mark.slow
def test_a_run_on_4_classes_fine_tuned_on_3_keeps_its_frozen_layers(runs, three_classes):
    source, tuned = runs["source"], runs["tuned"]
    best = json.loads((source / "checkpoints" / "best.json").read_text())["model"]["checkpoint"]
    assert (f"model.weights: googlenet_bn from {runs['copy'] / 'checkpoints' / best}; it was trained on 4 classes, the "
            f"data has 3: fc, aux1.fc2, aux2.fc2 start fresh") in runs["stderr"]
    assert "model.freeze: all_but_head:" in runs["stderr"] and " parameters frozen" in runs["stderr"]
    before, after = weights_of(source, best), weights_of(tuned)
    body = [k for k in after if not k.startswith(HEAD)]
    assert len(body) > 100 and all(torch.equal(before[k], after[k]) for k in body)  # batch-norm statistics too
    for key in ("fc.weight", "aux1.fc2.weight", "aux2.fc2.weight"):
        assert after[key].shape[0] == 3 and before[key].shape[0] == 4
    first = weights_of(tuned, "step-00000006")  # the end of epoch 1: the head learns on
    assert not torch.equal(first["fc.weight"], after["fc.weight"])
    config = load_config(tuned / "config.yaml")
    assert config.model.freeze == "all_but_head" and config.model.transform_input is False
    # The logged lr is the schedule's, not the head's 10x.
    records = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    scaled = float(re.search(r"updates in all, lr (\S+) \(optim.lr", runs["stderr"]).group(1))
    assert records and all(r["lr"] <= scaled for r in records) and records[0]["lr"] > scaled / 10


@pytest.mark.slow
def test_predict_evaluate_and_export_work_on_the_fine_tuned_run(runs, three_classes):
    tuned, root = runs["tuned"], runs["root"]
    classes = json.loads((tuned / "classes.json").read_text())
    manifest = json.loads((three_classes / "manifest.json").read_text())
    assert classes == manifest["classes"] and len(classes) == 3
    image = next((three_classes.parent / "images" / "val").rglob("*.JPEG"))
    out = root / "tuned.pth"
    commands = [
        ("pipeline.inference.predict", "--checkpoint", str(tuned), "--json", "--top", "3", str(image)),
        ("pipeline.inference.evaluate", "--checkpoint", str(tuned), "--workers", "0",
         "--out", str(root / "tuned-eval.json")),
        ("pipeline.inference.export", "--checkpoint", str(tuned), "--format", "state_dict", "--out", str(out)),
    ]
    with ThreadPoolExecutor(len(commands)) as pool:  # independent: run together
        predicted, evaluated, exported = pool.map(lambda command: run_module(*command, cwd=root), commands)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    top = json.loads(predicted.stdout)[0]["top"]
    assert sorted(c["id"] for c in top) == sorted(c["id"] for c in classes)
    assert sum(c["probability"] for c in top) == pytest.approx(1.0, abs=1e-5)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((root / "tuned-eval.json").read_text())
    assert report["val_samples"] == 12
    best = json.loads((tuned / "checkpoints" / "best.json").read_text())["model"]
    assert report["rows"][0]["top1_error"] == pytest.approx(best["val_top1_error"], abs=1e-9)
    assert exported.returncode == 0, exported.stderr[-3000:]
    model = torchvision.models.googlenet(num_classes=3, aux_logits=True, transform_input=False, init_weights=False)
    model.load_state_dict(torch.load(out, weights_only=True))
    # an export starts a fine-tune too, with the classes it records
    config = load_config(None, ["model.name=googlenet_bn", f"model.weights={out}"])
    lines = []
    start = build_network(config, 3, [c["id"] for c in classes], say=lines.append)
    assert lines == [f"model.weights: googlenet_bn from {out}"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in start.state_dict().items())


@pytest.mark.slow
def test_same_class_count_but_other_classes_start_a_fresh_head(runs):
    source = runs["source"]
    ids = [c["id"] for c in json.loads((source / "classes.json").read_text())]
    for class_ids, fresh in ((ids, False), ([f"other{i}" for i in range(4)], True)):
        config = load_config(None, ["model.name=googlenet_bn", f"model.weights={source}"])
        model = torchvision.models.googlenet(num_classes=4, aux_logits=True, transform_input=False, init_weights=True)
        initial = model.fc.weight.detach().clone()
        line = load_start_weights(model, config, class_ids)
        assert ("it was trained on other classes, the data has 4: fc, aux1.fc2, aux2.fc2 start fresh" in line) == fresh
        assert torch.equal(model.fc.weight, initial) == fresh
    with pytest.raises(ConfigError, match="holds googlenet_bn weights, but model.name is googlenet"):
        build_network(load_config(None, ["model.name=googlenet", f"model.weights={source}"]), 4)


def one_update(model: torch.nn.Module, head_lr_factor: float, steps: int = 1) -> None:
    """Plain SGD steps (no momentum or decay: the update is lr x gradient) on a fixed batch."""
    optim = load_config(None, [f"optim.head_lr_factor={head_lr_factor}", "optim.momentum=0",
                               "optim.weight_decay=0"]).optim
    optimizer = build_optimizer(model, 0.1, optim)
    torch.manual_seed(0)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(images)
        loss = torch.nn.functional.cross_entropy(out.logits, labels) + 0.3 * sum(
            torch.nn.functional.cross_entropy(a, labels) for a in (out.aux_logits1, out.aux_logits2))
        loss.backward()
        optimizer.step()


@pytest.mark.slow
def test_frozen_stem_and_frozen_body_do_not_change(runs):
    for part in ("stem", "all_but_head"):
        config = load_config(None, ["model.name=googlenet_bn", f"model.weights={runs['source']}",
                                    f"model.freeze={part}"])
        model = build_network(config, 3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        one_update(model, 1.0, steps=2)
        after = model.state_dict()
        frozen = ("conv1.", "conv2.", "conv3.") if part == "stem" else tuple(
            k for k in before if not k.startswith(HEAD))
        unchanged = {k for k in before if torch.equal(before[k], after[k])}
        assert {k for k in before if k.startswith(frozen)} <= unchanged  # weights and batch-norm statistics
        assert "inception3a.branch1.conv.weight" in unchanged if part == "all_but_head" else \
            "inception3a.branch1.conv.weight" not in unchanged
        assert "fc.weight" not in unchanged
        assert isinstance(model.conv1.bn, FrozenBatchNorm2d) and not model.conv1.bn.training and model.training
    with pytest.raises(ConfigError, match="model.freeze: the stem is defined for googlenet and googlenet_bn"):
        build_network(load_config(None, ["model.name=resnet18", "model.freeze=stem"]), 3)


def test_the_head_learns_at_its_own_lr():
    updates = {}
    for factor in (1.0, 10.0):
        torch.manual_seed(0)
        model = torchvision.models.googlenet(num_classes=3, aux_logits=True, transform_input=False, init_weights=True,
                                             dropout=0.0, dropout_aux=0.0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        one_update(model, factor)
        updates[factor] = {k: model.state_dict()[k] - before[k] for k in before}
    head = {f"{name}.{p}" for name in classifier_layers(model) for p in ("weight", "bias")}
    for key, delta in updates[10.0].items():
        if key in head:
            torch.testing.assert_close(delta, 10 * updates[1.0][key])
        elif delta.is_floating_point():
            torch.testing.assert_close(delta, updates[1.0][key])
    # the factor holds through warm-up and schedule, and the logged lr is the schedule's
    config = load_config(None, ["optim.head_lr_factor=10", "optim.bias_lr_factor=2", "schedule.name=cosine",
                                "schedule.epochs=4", "schedule.warmup_epochs=1"])
    groups = param_groups(model, 0.1, config.optim)
    assert [g["lr_factor"] for g in groups] == [1.0, 2.0, 1.0, 10.0, 20.0]
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    scheduler = build_scheduler(optimizer, config.schedule, updates_per_epoch=5)
    for _ in range(20):
        body, *_, head_weights, head_biases = (g["lr"] for g in optimizer.param_groups)
        assert head_weights == pytest.approx(10 * body) and head_biases == pytest.approx(20 * body)
        assert scheduled_lr(optimizer) == pytest.approx(body)
        optimizer.step()
        scheduler.step()


def test_export_metadata_that_is_not_ours_is_an_error_naming_it(tmp_path):
    weights = tmp_path / "model.pth"
    torch.save({"fc.weight": torch.zeros(3, 4)}, weights)
    for text in ("{not json", "[1, 2]", '{"format": "state_dict"}'):
        Path(f"{weights}.json").write_text(text)
        with pytest.raises(RunError, match=re.escape(f"{weights}.json: not the metadata of")):
            read_start_weights(weights)
