"""Prediction on image files and export to plain model files, for every kind of model the trainer
builds (the paper's GoogLeNet, torchvision's, the AlexNet baseline)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import torchvision
from PIL import Image
from tiny_runs import run_module

from imaging.crops import decode_center_crop
from imaging.photometric import normalize
from pipeline.inference import export as export_cli
from pipeline.inference import predict as predict_cli
from pipeline.inference.run_files import load_model

MODELS = ("googlenet", "googlenet_bn", "alexnet")


@pytest.fixture(scope="module")
def runs(inference_runs) -> dict[str, Path]:
    return inference_runs


@pytest.fixture(scope="module")
def images(tiny_data) -> list[Path]:
    return sorted((tiny_data.parent / "images" / "val").glob("*.JPEG"))[:3]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_predict_gives_the_top_classes_of_the_trainers_transform(name, runs, images, capsys):
    argv = ["--checkpoint", str(runs[name]), "--json", *map(str, images)]
    results = json.loads(_stdout(capsys, predict_cli.main, argv))
    classes = json.loads((runs[name] / "classes.json").read_text())
    loaded = load_model(runs[name])
    size = loaded.config.data.image_size
    inputs = torch.stack([decode_center_crop(p.read_bytes(), size, round(size * 256 / 224)) for p in images])
    with torch.no_grad():
        expected = loaded.model(normalize(inputs.float() / 255)).softmax(dim=1)
    assert [r["image"] for r in results] == list(map(str, images))
    for result, probs in zip(results, expected):
        top = result["top"]
        assert len(top) == 4  # 4 classes, fewer than 5
        assert [c["probability"] for c in top] == sorted((c["probability"] for c in top), reverse=True)
        assert [c["index"] for c in top] == probs.argsort(descending=True).tolist()
        assert [c["probability"] for c in top] == pytest.approx(probs.sort(descending=True).values.tolist(), abs=1e-5)
        assert all(c["name"] == classes[c["index"]]["name"] and c["id"] == classes[c["index"]]["id"] for c in top)


@pytest.mark.slow
def test_predict_text_output_crops_other_images_and_errors(runs, images, tmp_path, capsys):
    result = run_module("pipeline.inference.predict", "--checkpoint", str(runs["googlenet_bn"]), "--ema", "--top", "2",
                        str(images[0]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    names = {c["name"] for c in json.loads((runs["googlenet_bn"] / "classes.json").read_text())}
    assert lines[0] == str(images[0]) and len(lines) == 3
    assert lines[1].lstrip().startswith("1.") and "%" in lines[1] and lines[1].split("%  ")[1].split(" (")[0] in names
    # a transparent PNG and a greyscale JPEG, with 10 crops
    Image.new("RGBA", (50, 70), (200, 10, 10, 128)).save(tmp_path / "a.png")
    Image.new("L", (90, 45), 128).save(tmp_path / "b.jpg")
    out = json.loads(_stdout(capsys, predict_cli.main, ["--checkpoint", str(runs["alexnet"]), "--crops", "10", "--json",
                                                         str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]))
    assert [sum(c["probability"] for c in r["top"]) for r in out] == pytest.approx([1.0, 1.0], abs=1e-5)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main(["--checkpoint", str(runs["googlenet"]), str(images[0]), str(tmp_path / "broken.jpg")])
    assert exit_info.value.code == 2 and "broken.jpg: cannot read the image" in capsys.readouterr().err


def test_exported_state_dict_loads_into_torchvision(runs, tmp_path, capsys):
    loaded = load_model(runs["googlenet_bn"])
    out = tmp_path / "googlenet.pth"
    text = _stdout(capsys, export_cli.main, ["--checkpoint", str(runs["googlenet_bn"]), "--format", "state_dict",
                                              "--out", str(out)])
    call = "torchvision.models.googlenet(num_classes=4, aux_logits=True, transform_input=False, init_weights=False)"
    assert call in text and json.loads(Path(f"{out}.json").read_text())["builds_with"] == call
    model = torchvision.models.googlenet(num_classes=4, aux_logits=True, transform_input=False, init_weights=False)
    model.load_state_dict(torch.load(out, weights_only=True))  # strict: every key, unchanged
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), loaded.model(x))
    alexnet = tmp_path / "alexnet.pth"
    export_cli.main(["--checkpoint", str(runs["alexnet"]), "--format", "state_dict", "--out", str(alexnet)])
    torchvision.models.alexnet(num_classes=4).load_state_dict(torch.load(alexnet, weights_only=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_and_onnx_give_the_models_outputs(name, runs, tmp_path):
    loaded = load_model(runs[name])
    size = loaded.config.data.image_size
    x = torch.randn(3, 3, size, size)  # another batch size than the export's example
    with torch.no_grad():
        expected = loaded.model(x)
    scripted = export_cli.main(["--checkpoint", str(runs[name]), "--format", "torchscript",
                                "--out", str(tmp_path / "model.pt")])
    torch.testing.assert_close(torch.jit.load(str(scripted))(x), expected, rtol=1e-4, atol=1e-5)
    onnx = export_cli.main(["--checkpoint", str(runs[name]), "--format", "onnx", "--out", str(tmp_path / "model.onnx")])
    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    (logits,) = session.run(None, {"images": x.numpy()})
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-4, atol=1e-4)
    meta = json.loads(Path(f"{onnx}.json").read_text())
    assert meta["model"] == name and meta["image_size"] == size and len(meta["classes"]) == 4


def test_default_export_path_and_ema(runs):
    out = export_cli.main(["--checkpoint", str(runs["googlenet_bn"]), "--format", "state_dict", "--ema"])
    checkpoint = load_model(runs["googlenet_bn"]).checkpoint
    assert out == runs["googlenet_bn"] / "export" / f"googlenet_bn-{checkpoint.name}-ema.pth"
    ema = load_model(runs["googlenet_bn"], ema=True).model.state_dict()
    saved = torch.load(out, weights_only=True)
    assert saved.keys() == ema.keys() and all(torch.equal(saved[k], ema[k]) for k in saved)


def _stdout(capsys, main, argv: list[str]) -> str:
    capsys.readouterr()
    main(argv)
    return capsys.readouterr().out
