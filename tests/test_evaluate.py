"""Test-time evaluation: crop geometry, ensemble averaging, exact counts over processes, runs on
disk, and torchvision GoogLeNet weights as a starting point."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from PIL import Image
from safetensors.torch import load_file
from tiny_runs import run_module, torchvision_weights, train_process, train_together
from torchvision.transforms.v2 import functional as F

from imaging.crops import decode_center_crop
from imaging.photometric import normalize
from pipeline.config import ConfigError, load_config
from pipeline.data.prepared import equal_ranges, open_prepared
from pipeline.inference import evaluate as evaluate_cli
from pipeline.inference.crop_stream import val_images
from pipeline.inference.evaluate import average_probabilities, row_logits, table_rows
from pipeline.inference.multi_crop import (
    Crop,
    area,
    centre_crop,
    crop_plan,
    crop_stack,
    ffcv_centre_crop,
    ffcv_crop_stack,
    image_crops,
    network_input,
    paper_crops,
    paper_scales,
    render,
    ten_crops,
)
from pipeline.inference.run_files import load_initial_model, load_model
from pipeline.models import forward_with_aux
from pipeline.train.run import build_network


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """Two tiny runs: the paper's GoogLeNet with EMA, and torchvision's GoogLeNet started from a
    torchvision weights file (lr so small that its weights stay the file's)."""
    root = tmp_path_factory.mktemp("eval-runs")
    weights = torchvision_weights(root / "googlenet-tv.pth", num_classes=4)
    trained = train_together(tiny_data, root, {
        "paper": ["model.name=googlenet", "ema.enabled=true", "schedule.epochs=2"],
        "tv": ["model.name=googlenet_bn", f"model.weights={weights}", "optim.lr=1e-9", "train.max_steps=2"],
    })
    return {**trained, "weights": weights, "root": root}


# ----------------------------------------------------------------------------- geometry

def _boxes(crops: list[Crop]) -> list[tuple]:
    return [(c.resized, c.box) for c in crops if not c.flip]


def test_144_crops_of_a_landscape_image():
    crops = paper_crops(400, 300, 224)
    assert len(crops) == 144 and len(set(crops)) == 144
    assert [c.flip for c in crops] == [False] * 72 + [True] * 72
    assert [(c.resized, c.box) for c in crops[72:]] == _boxes(crops)  # the mirrors, in the same order
    # shorter side 256, 288, 320, 352; longer side truncated as torchvision's Resize
    assert sorted({c.resized for c in crops}) == [(341, 256), (384, 288), (426, 320), (469, 352)]
    at_256 = [c.box for c in crops[:72] if c.resized == (341, 256)]
    assert len(at_256) == 18  # 3 squares x (4 corners + centre + the whole square)
    # left, centre and right squares; in each the 4 corners, the centre and the square itself
    for i, x in enumerate((0, 42, 85)):
        assert at_256[6 * i:6 * i + 6] == [(x, 0, 224, 224), (x + 32, 0, 224, 224), (x, 32, 224, 224),
                                           (x + 32, 32, 224, 224), (x + 16, 16, 224, 224), (x, 0, 256, 256)]
    for c in crops:
        left, top, w, h = c.box
        assert 0 <= left and left + w <= c.resized[0] and 0 <= top and top + h <= c.resized[1]
        assert (w == h == 224) or (w == h == min(c.resized))  # a crop or a whole square
    assert sum(c.box[2] == 224 for c in crops) == 4 * 3 * 5 * 2


def test_144_crops_of_a_portrait_image_take_top_centre_bottom_squares():
    crops = paper_crops(300, 400, 224)
    assert len(crops) == 144
    squares = [c.box for c in crops[:72] if c.box[2] == c.box[3] == min(c.resized)]
    assert squares[:3] == [(0, 0, 256, 256), (0, 42, 256, 256), (0, 85, 256, 256)]
    assert len(squares) == 12 and all(box[0] == 0 for box in squares)
    assert {c.resized for c in crops} == {(256, 341), (288, 384), (320, 426), (352, 469)}


def test_crops_scale_with_the_training_resolution():
    assert paper_scales(224) == (256, 288, 320, 352) and paper_scales(32) == (37, 41, 46, 50)
    crops = paper_crops(72, 40, 32)
    assert len(crops) == 144 and {c.resized[1] for c in crops} == {37, 41, 46, 50}
    assert all(c.box[2] == c.box[3] and c.box[2] in (32, 37, 41, 46, 50) for c in crops)


def test_10_crops_are_the_corners_and_centre_of_the_resized_image_and_mirrors():
    crops = ten_crops(400, 300, 224, 256)
    assert len(crops) == 10 and [c.flip for c in crops] == [False] * 5 + [True] * 5
    assert _boxes(crops) == [((341, 256), b) for b in [(0, 0, 224, 224), (117, 0, 224, 224), (0, 32, 224, 224),
                                                       (117, 32, 224, 224), (58, 16, 224, 224)]]
    assert centre_crop(400, 300, 224, 256) == [Crop((341, 256), (58, 16, 224, 224))]
    assert [len(crop_plan(n, 400, 300, 224, 256)) for n in (1, 10, 144)] == [1, 10, 144]
    with pytest.raises(ValueError, match="crops: 12 is not one of"):
        crop_plan(12, 400, 300, 224, 256)


def test_rendered_crops_are_the_boxes_of_the_resized_image():
    image = torch.randint(0, 256, (60, 90, 3), dtype=torch.uint8)  # height x width x channels
    crops = paper_crops(90, 60, 32)
    pixels = render(image, crops, 32)
    assert pixels.shape == (144, 32, 32, 3) and pixels.dtype == torch.uint8
    planes = F.resize(image.permute(2, 0, 1).contiguous(), [37, 55], antialias=True)
    first = crops[0]
    assert first.resized == (55, 37) and first.box == (0, 0, 32, 32)
    assert torch.equal(pixels[0].permute(2, 0, 1), planes[:, :32, :32])
    square = crops[5]  # the whole left square, resized to 32 x 32
    assert square.box == (0, 0, 37, 37)
    assert torch.equal(pixels[5].permute(2, 0, 1), F.resize(planes[:, :37, :37], [32, 32], antialias=True))
    assert torch.equal(pixels[72:], pixels[:72].flip(2))  # the mirrors
    inputs = network_input(pixels[:2])
    assert inputs.shape == (2, 3, 32, 32) and inputs.is_contiguous()
    torch.testing.assert_close(inputs, normalize(pixels[:2].permute(0, 3, 1, 2).float() / 255))


def test_the_centre_crop_is_the_trainers_also_with_reduced_scale_jpeg_decoding():
    generator = torch.Generator().manual_seed(0)
    array = torch.randint(0, 256, (200, 300, 3), dtype=torch.uint8, generator=generator).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90)
    encoded = buffer.getvalue()
    # 300 x 200 at 32 px: the centre crop's box spans 173 px, so the trainer decodes at 1/4 scale
    trainer = decode_center_crop(encoded, 32, 37)
    stack = crop_stack(Image.open(io.BytesIO(encoded)), 144, 32, 37)
    assert stack.shape == (145, 32, 32, 3)
    assert torch.equal(stack[0].permute(2, 0, 1), trainer)
    # ...while the other crops come from the full-size decode
    full = Image.open(io.BytesIO(encoded))
    full.load()
    assert torch.equal(stack[1:], image_crops(full, 144, 32, 37))
    assert torch.equal(crop_stack(Image.open(io.BytesIO(encoded)), 1, 32, 37)[0].permute(2, 0, 1), trainer)


def test_ffcv_crops_are_ffcvs_centre_box_then_inter_area_everywhere():
    cv2 = pytest.importorskip("cv2", reason="OpenCV comes with the optional FFCV")
    # FFCV's get_center_crop: a square of int(32/37 x 43) = 37 px, offsets floor((71 - 37) / 2), floor((43 - 37) / 2)
    assert ffcv_centre_crop(71, 43, 32, 37) == [Crop((71, 43), (17, 3, 37, 37))]
    image = torch.randint(0, 256, (60, 90, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pixels = image.numpy()
    stack = ffcv_crop_stack(pixels, 10, 32, 37)
    assert stack.shape == (11, 32, 32, 3)
    (centre,) = ffcv_centre_crop(90, 60, 32, 37)
    left, top, side, _ = centre.box
    expected = cv2.resize(pixels[top:top + side, left:left + side], (32, 32), interpolation=cv2.INTER_AREA)
    assert torch.equal(stack[0], torch.from_numpy(expected))
    assert torch.equal(ffcv_crop_stack(pixels, 1, 32, 37), stack[:1])
    # the 10 crops: the same boxes as from shards, in the image resized with INTER_AREA
    assert torch.equal(stack[1:], render(image, ten_crops(90, 60, 32, 37), 32, resize=area))
    resized = cv2.resize(pixels, (55, 37), interpolation=cv2.INTER_AREA)
    assert torch.equal(stack[1], torch.from_numpy(resized[:32, :32]))


def test_val_images_cover_the_split_once_in_any_number_of_ranges(tiny_data):
    data = open_prepared(tiny_data)
    whole = [(key, label) for key, _, label in val_images(data, 0, data.val_samples)]
    assert len(whole) == 16 and len({k for k, _ in whole}) == 16
    parts = [(key, label) for a, b in equal_ranges(16, 6) for key, _, label in val_images(data, a, b)]
    assert parts == whole
    _, image, _ = next(val_images(data, 3, 4))
    assert image.mode == "RGB"


# ----------------------------------------------------------------------------- averaging

def test_ensemble_averages_softmax_over_crops_then_models():
    p = torch.tensor([
        [[[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]]],  # model 0, one image, two crops: class 0
        [[[0.1, 0.8, 0.1], [0.1, 0.7, 0.2]]],  # model 1: class 1
    ])
    probs = average_probabilities(p.log() + 3.0)  # logits up to a constant
    torch.testing.assert_close(probs, torch.tensor([[0.325, 0.55, 0.125]]))
    # the first model alone, centre crop (position 0) versus the test-time crops (1...)
    torch.testing.assert_close(average_probabilities(row_logits(p.log(), 1, 1)), torch.tensor([[0.6, 0.3, 0.1]]))
    torch.testing.assert_close(average_probabilities(row_logits(p.log(), 2, 10)), torch.tensor([[0.3, 0.55, 0.15]]))
    assert table_rows(1, 1) == [(1, 1)]
    assert table_rows(1, 144) == [(1, 1), (1, 144)]
    assert table_rows(7, 144) == [(1, 1), (1, 144), (7, 1), (7, 144)]
    assert table_rows(3, 1) == [(1, 1), (3, 1)]


# ----------------------------------------------------------------------------- runs on disk

def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.slow
def test_144_crops_of_a_run_in_one_process(runs):
    result = run_module("pipeline.inference.evaluate", "--run", str(runs["paper"]), "--checkpoint", "last", "--crops", "144",
                        cwd=runs["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = runs["paper"] / "eval-144crops.json"
    assert f"written to {out}" in result.stderr
    report = json.loads(out.read_text())
    assert [(r["models"], r["crops"], r["cost"]) for r in report["rows"]] == [(1, 1, 1), (1, 144, 144)]
    assert report["val_samples"] == 16 and report["crops"] == 144 and report["processes"] == 1
    # the base row is the trainer's own validation of that checkpoint
    trainer = _metrics(runs["paper"])
    base = report["rows"][0]
    assert (base["top1_error"], base["top5_error"]) == (trainer["val_top1_error"], trainer["val_top5_error"])
    assert base["loss"] == pytest.approx(trainer["val_loss"], rel=1e-4)
    header = "| Number of models | Number of crops | Cost | Top-1 error | Top-5 error | Compared to base |"
    assert header in result.stdout
    lines = result.stdout.splitlines()
    assert lines[2].replace(" ", "").startswith("|1|1|1|") and lines[2].endswith("base |")
    assert lines[3].replace(" ", "").startswith("|1|144|144|")


def _reference_top1(models, data, crops: int) -> dict[tuple[int, int], float]:
    """Every image in one process, no loader: what the processes must add up to."""
    stacks, labels = [], []
    for _, image, label in val_images(data, 0, data.val_samples):
        stacks.append(crop_stack(image, crops, 32, 37))
        labels.append(label)
    x = network_input(torch.stack(stacks).flatten(0, 1))
    with torch.inference_mode():
        logits = torch.stack([forward_with_aux(m.model, x).logits for m in models])
    logits = logits.view(len(models), len(labels), stacks[0].shape[0], -1)
    labels = torch.tensor(labels)
    rows = {}
    for row in table_rows(len(models), crops):
        top1 = average_probabilities(row_logits(logits, *row)).argmax(dim=1)
        rows[row] = 1 - (top1 == labels).float().mean().item()
    return rows


@pytest.mark.slow
def test_an_ensemble_of_two_architectures_over_two_processes_counts_every_image_once(runs, tiny_data):
    result = run_module("pipeline.inference.evaluate", "--run", str(runs["paper"]), "--runs", str(runs["tv"]), "--checkpoint",
                        "last", "--crops", "10", "--workers", "2", "--batch-size", "24", cwd=runs["root"], processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((runs["paper"] / "eval-2models-10crops.json").read_text())
    assert report["processes"] == 2 and report["val_samples"] == 16
    assert [r["model"] for r in report["models"]] == ["googlenet", "googlenet_bn"]
    rows = {(r["models"], r["crops"]): (r["top1_error"], r["top5_error"]) for r in report["rows"]}
    assert list(rows) == [(1, 1), (1, 10), (2, 1), (2, 10)]
    models = [load_model(runs["paper"], "last"), load_model(runs["tv"], "last")]
    expected = _reference_top1(models, open_prepared(tiny_data), 10)
    for row, (top1, top5) in rows.items():
        assert top1 == pytest.approx(expected[row], abs=1e-9), row
        assert top5 == 0.0  # 4 classes
    assert rows[(1, 1)][0] == _metrics(runs["paper"])["val_top1_error"]


@pytest.mark.slow
def test_ema_weights_and_clear_errors(runs, tmp_path, capsys):
    result = run_module("pipeline.inference.evaluate", "--run", str(runs["paper"]), "--checkpoint", "last", "--ema",
                        "--workers", "0", cwd=runs["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((runs["paper"] / "eval-1crops-ema.json").read_text())
    assert report["rows"][0]["top1_error"] == _metrics(runs["paper"])["ema_val_top1_error"]
    assert report["models"][0]["ema"] is True

    # a run that differs in its classes, one that differs in resolution
    odd = tmp_path / "odd"
    (odd / "checkpoints").mkdir(parents=True)
    shutil.copytree(runs["paper"] / "checkpoints" / "step-00000024", odd / "checkpoints" / "step-00000024")
    shutil.copy(runs["paper"] / "config.yaml", odd / "config.yaml")
    classes = json.loads((runs["paper"] / "classes.json").read_text())
    classes[3]["id"] = "n00000000"
    (odd / "classes.json").write_text(json.dumps(classes))
    other_run = str(runs["tv"] / "checkpoints" / "step-00000002")
    for args, message in [
        (["--run", str(runs["tv"]), "--ema"], f"{runs['tv']} was trained without EMA (ema.enabled: false)"),
        (["--run", str(runs["paper"]), "--runs", str(odd)], "classes are not those of"),
        (["--run", str(odd)], "classes are not the 4 classes the models were trained on"),
        (["--run", str(tmp_path / "nothing")], "no such run or checkpoint directory"),
        (["--run", str(runs["paper"]), "--checkpoint", other_run], "a checkpoint of another run"),
        (["--run", str(runs["paper"]), "--checkpoint", str(tmp_path)], "not a checkpoint directory"),
        (["--config", str(runs["paper"] / "config.yaml")], "model.weights: not set"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            evaluate_cli.main(args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, args
    config = yaml.safe_load((runs["paper"] / "config.yaml").read_text())
    config["data"]["image_size"] = 48
    (odd / "config.yaml").write_text(yaml.safe_dump(config))
    (odd / "classes.json").write_text(json.dumps(json.loads((runs["paper"] / "classes.json").read_text())))
    with pytest.raises(SystemExit):
        evaluate_cli.main(["--run", str(runs["paper"]), "--runs", str(odd)])
    assert "data.image_size/eval_resize (48, 55) differ" in capsys.readouterr().err


def test_a_checkpoint_directory_names_its_run(runs):
    checkpoint = runs["paper"] / "checkpoints" / "step-00000012"
    loaded = load_model(checkpoint)
    assert loaded.run_dir == runs["paper"] and loaded.checkpoint == checkpoint
    best = json.loads((runs["paper"] / "checkpoints" / "best.json").read_text())
    assert load_model(runs["paper"]).checkpoint.name == best["model"]["checkpoint"]
    assert load_model(runs["paper"], ema=True).checkpoint.name == best["ema"]["checkpoint"]  # the EMA's own best
    assert load_model(runs["paper"], "last").checkpoint.name == "step-00000024"
    assert loaded.classes == json.loads((runs["paper"] / "classes.json").read_text())


# ----------------------------------------------------------------------------- torchvision weights

def start_from(weights: Path, classes: int, *overrides: str) -> tuple[torch.nn.Module, list[str]]:
    """googlenet_bn as the trainer starts it from a weights file, and the lines it printed."""
    lines = []
    config = load_config(None, ["model.name=googlenet_bn", f"model.weights={weights}", *overrides])
    return build_network(config, classes, say=lines.append), lines


@pytest.mark.slow
def test_torchvision_weights_behave_as_torchvisions_googlenet_with_weights(tmp_path):
    path = torchvision_weights(tmp_path / "tv.pth", num_classes=5)
    state = torch.load(path, weights_only=True)
    assert any(k.startswith("aux1.") for k in state)  # as in torchvision's published file
    # what torchvision.models.googlenet(weights=...) builds: transform_input on, heads loaded then removed
    reference = torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True, init_weights=False,
                                             num_classes=5)
    reference.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    for aux_logits in (False, True):
        model, lines = start_from(path, 5, f"model.aux_logits={aux_logits}")
        assert model.transform_input and lines == [f"model.weights: googlenet_bn from {path} (torchvision's input "
                                                   f"convention)"]
        torch.testing.assert_close(model.eval()(x), reference.eval()(x))
    assert torch.equal(model.aux1.fc2.weight, state["aux1.fc2.weight"])
    no_heads = torchvision_weights(tmp_path / "no-heads.pth", num_classes=5, aux_logits=False)
    _, lines = start_from(no_heads, 5)  # the model's heads stay initialised, and the line says so
    assert "aux1, aux2 start fresh (not in the weights)" in lines[0]
    for file, overrides, message in [
        (tmp_path / "missing.pth", [], "missing.pth: no such run directory, checkpoint directory or weights file"),
        (path, ["model.name=googlenet"], "looks like torchvision's GoogLeNet file, which only googlenet_bn takes"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_network(load_config(None, [f"model.weights={file}", *overrides]), 5)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth: not a PyTorch state-dict file"):
        start_from(tmp_path / "junk.pth", 5)
    with pytest.raises(ConfigError, match="model.weights: '' is out of range"):
        load_config(None, ["model.weights=''"])


@pytest.mark.slow
def test_the_trainer_starts_from_torchvision_weights_and_evaluation_sees_them(runs, tiny_data):
    state = torch.load(runs["weights"], weights_only=True)
    trained = load_file(runs["tv"] / "checkpoints" / "step-00000002" / "model.safetensors")
    torch.testing.assert_close(trained["conv1.conv.weight"], state["conv1.conv.weight"], rtol=0, atol=1e-6)
    assert load_model(runs["tv"]).model.transform_input  # rebuilt with the weights' input convention
    # the weights as the trainer starts from them, evaluated straight from a recipe
    result = run_module("pipeline.inference.evaluate", "--config", str(runs["tv"] / "config.yaml"), "--workers", "0",
                        "--out", str(runs["root"] / "initial.json"), cwd=runs["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((runs["root"] / "initial.json").read_text())
    assert report["val_samples"] == 16 and report["models"][0]["checkpoint"] is None
    initial = load_initial_model(load_config(runs["tv"] / "config.yaml"))
    expected = _reference_top1([initial], open_prepared(tiny_data), 1)
    assert report["rows"][0]["top1_error"] == pytest.approx(expected[(1, 1)], abs=1e-9)
    # a missing weights file stops the trainer with one line
    missing = train_process(tiny_data, runs["root"], "fails", "model.name=googlenet_bn", "model.weights=/no/such.pth")
    assert missing.returncode == 2 and "error: model.weights: /no/such.pth: no such run directory, checkpoint directory or weights file" in missing.stderr

