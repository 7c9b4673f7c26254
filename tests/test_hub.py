"""torch.hub's entry points (``hubconf.py``, ``pipeline/inference/hub.py``): runs, checkpoints, EMA
weights and exported state dicts loaded through ``torch.hub.load(..., source='local')`` give the
classes and probabilities of ``pipeline.inference.predict``; wrong weights give errors naming the
path; and the example of docs/hub.md runs as written."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from PIL import Image

from imaging.crops import decode_center_crop
from imaging.photometric import normalize
from pipeline.inference.export import export
from pipeline.inference.hub import EvalTransform
from pipeline.inference.predict import predict
from pipeline.inference.run_files import LoadedModel, RunError
from pipeline.inference.run_files import load_model as load_run

PROJECT = ("imaging", "shards", "data_prep", "pipeline")
LOADED: dict[tuple, LoadedModel] = {}


def load_model(path: Path, which: str = "best", ema: bool = False) -> LoadedModel:
    """``run_files.load_model``, once per (path, checkpoint, ema): building a model takes a second."""
    key = (str(path), which, ema)
    if key not in LOADED:
        LOADED[key] = load_run(path, which, ema)
    return LOADED[key]


def hub_load(name: str, **kwargs) -> torch.nn.Module:
    return torch.hub.load(str(ROOT), name, source="local", **kwargs)


def hubconf():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(inference_runs) -> dict[str, Path]:
    return {name: inference_runs[name] for name in ("googlenet", "googlenet_bn")}


@pytest.fixture(scope="module")
def images(tiny_data) -> list[Path]:
    return sorted((tiny_data.parent / "images" / "val").glob("*.JPEG"))[:3]


def hub_top(model: torch.nn.Module, images: list[Path], top: int = 5) -> list[list[tuple[int, float]]]:
    """(index, probability) of the ``top`` classes of each image, through ``model.transforms``."""
    batch = []
    for path in images:
        with Image.open(path) as image:
            batch.append(model.transforms(image))
    with torch.no_grad():
        probs = model(torch.stack(batch)).softmax(dim=1)
    values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
    return [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]


def assert_same_as_predict(model: torch.nn.Module, run: Path, images: list[Path], which: str = "best",
                           ema: bool = False) -> None:
    loaded = load_model(run, which, ema)
    expected = predict(loaded, images)
    got = hub_top(model, images)
    assert not model.training
    assert model.meta["checkpoint"] == str(loaded.checkpoint) and model.meta["ema"] == ema
    for result, top in zip(expected, got, strict=True):
        assert [i for i, _ in top] == [c["index"] for c in result["top"]]
        assert [model.classes[i] for i, _ in top] == [c["name"] for c in result["top"]]
        assert [model.class_ids[i] for i, _ in top] == [c["id"] for c in result["top"]]
        assert [p for _, p in top] == pytest.approx([c["probability"] for c in result["top"]], abs=1e-6)
    state, reference = model.state_dict(), loaded.model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


def assert_classes_of(model: torch.nn.Module, run: Path) -> None:
    classes = json.loads((run / "classes.json").read_text())
    assert model.classes == [c["name"] for c in classes]
    assert model.class_ids == [c["id"] for c in classes]


# ----------------------------------------------------------------------------- without a run


def test_the_hub_lists_exactly_the_two_entry_points_with_their_help(monkeypatch):
    # torch.hub.list and help take GitHub repositories only: give them this checkout as the download
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *args, **kwargs: str(ROOT))
    assert torch.hub.list("owner/repo", trust_repo=True, verbose=False) == ["googlenet", "googlenet_bn"]
    text = torch.hub.help("owner/repo", "googlenet", trust_repo=True)
    assert "paper" in text and "weights:" in text and "model.classes" in text and "model.transforms" in text
    assert "batch normalisation" in torch.hub.help("owner/repo", "googlenet_bn", trust_repo=True)


def third_party_imports(start: str) -> dict[str, set[str]]:
    """The packages outside the project and the standard library that importing ``start`` imports,
    following the project's module-level imports: package -> the project modules that import it."""
    def source(module: str) -> Path:
        path = ROOT.joinpath(*module.split("."))
        return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")

    found: dict[str, set[str]] = {}
    seen: set[str] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]  # its packages
        path = source(module)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                names = [base] + [f"{base}.{a.name}" for a in node.names if source(f"{base}.{a.name}").is_file()]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in PROJECT:
                    todo += [name] if source(name).is_file() else []
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(module)
    return found


def test_dependencies_are_importable_and_exactly_what_loading_imports():
    dependencies = hubconf().dependencies
    for name in dependencies:
        importlib.import_module(name)
    needed = third_party_imports("pipeline.inference.hub")
    unlisted = {name: sorted(by) for name, by in needed.items() if name not in dependencies}
    assert not unlisted, f"loading imports packages that hubconf.dependencies leaves out (package: by): {unlisted}"
    assert set(dependencies) <= set(needed), f"unneeded in hubconf.dependencies: {set(dependencies) - set(needed)}"


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::torch.jit.TracerWarning")
def test_untrained_models_keep_a_plain_state_dict_and_work_with_to_and_jit():
    paper = hub_load("googlenet")
    bn = hub_load("googlenet_bn", num_classes=4, aux_logits=False)
    assert not paper.training and not bn.training
    assert paper.fc.out_features == 1000 and paper.aux1 is not None
    assert bn.fc.out_features == 4 and bn.aux1 is None and type(bn).__name__ == "GoogLeNet"
    assert paper.classes is None and paper.class_ids is None and paper.meta["source"] is None
    assert paper.transforms == EvalTransform(224, 256) and paper.meta["image_size"] == 224
    text = repr(paper.transforms)
    assert "256" in text and "224x224" in text and "0.485" in text and "0.229" in text
    # the attributes are neither modules, parameters nor buffers
    fresh = torchvision_googlenet(4)
    assert bn.state_dict().keys() == fresh.state_dict().keys()
    assert "transforms" not in dict(bn.named_modules()) and "transforms" not in repr(bn)
    moved = bn.to(torch.float64)
    assert moved.classes is None and moved.transforms == EvalTransform(224, 256)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = bn(x)
        assert isinstance(expected, torch.Tensor)  # eval mode: the logits, not GoogLeNetOutputs
        torch.testing.assert_close(torch.jit.script(bn)(x).logits, expected)  # scripted: always the tuple
        y = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(torch.jit.trace(paper, y, check_trace=False)(y), paper(y))


def torchvision_googlenet(num_classes: int) -> torch.nn.Module:
    import torchvision

    return torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, num_classes=num_classes)


def test_the_transform_gives_the_trainers_validation_pixels(tmp_path):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (70, 50, 3), dtype=torch.uint8, generator=generator).numpy()
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=90)
    transform = EvalTransform(32, 37)
    with Image.open(tmp_path / "a.jpg") as image:
        got = transform(image)
    expected = normalize(decode_center_crop((tmp_path / "a.jpg").read_bytes(), 32, 37).float() / 255)
    assert got.shape == (3, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    for mode in ("RGBA", "L", "P"):
        assert transform(Image.fromarray(pixels).convert(mode)).shape == (3, 32, 32)
    with pytest.raises(TypeError, match="PIL image"):
        transform(torch.zeros(3, 32, 32))


def test_missing_paths_and_other_exports_give_errors_naming_them(tmp_path):
    for missing in (tmp_path / "no-run", tmp_path / "no-file.pth"):
        with pytest.raises(ValueError, match=re.escape(str(missing))):
            hub_load("googlenet", weights=missing)
    (tmp_path / "model.pt").write_bytes(b"not loaded")
    (tmp_path / "model.onnx").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'model.pt'}: a TorchScript export") + ".*jit.load"):
        hub_load("googlenet", weights=tmp_path / "model.pt")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'model.onnx'}: an ONNX export") + ".*onnxruntime"):
        hub_load("googlenet_bn", weights=str(tmp_path / "model.onnx"))
    torch.save(torchvision_googlenet(4).state_dict(), tmp_path / "plain.pth")  # no plain.pth.json
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'plain.pth'}: no plain.pth.json beside it")):
        hub_load("googlenet_bn", weights=tmp_path / "plain.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'empty'}: neither a run directory")):
        hub_load("googlenet", weights=tmp_path / "empty")
    with pytest.raises(ValueError, match="untrained"):
        hub_load("googlenet", ema=True)


# ----------------------------------------------------------------------------- trained runs


@pytest.mark.slow
def test_a_run_directory_gives_predicts_classes_and_probabilities(runs, images):
    model = hub_load("googlenet", weights=runs["googlenet"])
    assert_classes_of(model, runs["googlenet"])
    assert_same_as_predict(model, runs["googlenet"], images)
    assert model.meta["model"] == "googlenet" and model.meta["source"] == str(runs["googlenet"])
    assert model.transforms == EvalTransform(32, 37)
    last = hub_load("googlenet", weights=str(runs["googlenet"]), checkpoint="last")
    assert last.meta["checkpoint"] == str(load_model(runs["googlenet"], "last").checkpoint)


@pytest.mark.slow
def test_a_checkpoint_directory_and_the_ema_weights(runs, images):
    run = runs["googlenet_bn"]
    checkpoint = load_model(run).checkpoint
    model = hub_load("googlenet_bn", weights=checkpoint)
    assert_classes_of(model, run)
    assert_same_as_predict(model, checkpoint, images)
    ema = hub_load("googlenet_bn", weights=run, ema=True)
    assert_same_as_predict(ema, run, images, ema=True)
    trained = load_model(run).model.state_dict()
    assert any(not torch.equal(t, trained[k]) for k, t in ema.state_dict().items())  # not the trained weights
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint}: checkpoint='last'")):
        hub_load("googlenet_bn", weights=checkpoint, checkpoint="last")


@pytest.mark.slow
def test_an_exported_state_dict_and_one_exported_before_the_hub(runs, images, tmp_path):
    run = runs["googlenet_bn"]
    out = export(load_model(run, ema=True), "state_dict", tmp_path / "bn.pth")
    model = hub_load("googlenet_bn", weights=out, ema=True)
    assert_classes_of(model, run)
    assert_same_as_predict(model, run, images, ema=True)
    assert model.meta["source"] == str(out) and model.aux1 is not None and model.transform_input is False
    # metadata as written before it had aux_logits, transform_input and dropout: inferred
    meta = json.loads(Path(f"{out}.json").read_text())
    old = {k: v for k, v in meta.items() if k not in ("aux_logits", "transform_input", "dropout", "num_classes")}
    Path(f"{out}.json").write_text(json.dumps(old))
    assert_same_as_predict(hub_load("googlenet_bn", weights=out), run, images, ema=True)
    Path(f"{out}.json").write_text(json.dumps({**old, "builds_with": meta["builds_with"].replace(
        "transform_input=False", "transform_input=True")}))
    assert hub_load("googlenet_bn", weights=out).transform_input is True
    paper = export(load_model(runs["googlenet"]), "state_dict", tmp_path / "paper.pth")
    assert_same_as_predict(hub_load("googlenet", weights=paper), runs["googlenet"], images)


@pytest.mark.slow
def test_weights_of_the_other_network_and_arguments_that_disagree(runs, tmp_path):
    run, paper_run = runs["googlenet_bn"], runs["googlenet"]
    with pytest.raises(ValueError, match=re.escape(f"{run}: weights of googlenet_bn, not googlenet")):
        hub_load("googlenet", weights=run)
    checkpoint = load_model(paper_run).checkpoint
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint}: weights of googlenet, not googlenet_bn")):
        hub_load("googlenet_bn", weights=checkpoint)
    out = export(load_model(paper_run), "state_dict", tmp_path / "paper.pth")
    with pytest.raises(ValueError, match=re.escape(f"{out}: weights of googlenet, not googlenet_bn")):
        hub_load("googlenet_bn", weights=out)
    with pytest.raises(ValueError, match=re.escape(f"{out}: exported without --ema")):
        hub_load("googlenet", weights=out, ema=True)
    with pytest.raises(ValueError, match=re.escape(f"{paper_run} was trained without EMA")):
        hub_load("googlenet", weights=paper_run, ema=True)
    with pytest.raises(ValueError, match=re.escape(f"{paper_run}: its weights have 4 classes, not num_classes=1000")):
        hub_load("googlenet", weights=paper_run, num_classes=1000)
    with pytest.raises(ValueError, match="its weights have auxiliary heads, not aux_logits=False"):
        hub_load("googlenet", weights=paper_run, aux_logits=False)
    with pytest.raises(RunError, match="a checkpoint of another run"):
        hub_load("googlenet", weights=paper_run, checkpoint=str(load_model(run).checkpoint))


def python_example() -> str:
    """The python block of docs/hub.md."""
    (block,) = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "hub.md").read_text(), flags=re.S)
    return block


@pytest.mark.slow
def test_the_documentations_example(runs, images, monkeypatch, capsys):
    code = python_example()
    assert 'torch.hub.load(".", "googlenet", source="local", weights=RUN)' in code
    for variable, value in (("RUN", runs["googlenet"]), ("IMAGE", images[0])):
        code, count = re.subn(rf"^{variable} = .*$", f"{variable} = {str(value)!r}", code, flags=re.M)
        assert count == 1, f"docs/hub.md's example should set {variable} once"
    monkeypatch.chdir(ROOT)  # the example's "." is the repository root
    capsys.readouterr()
    exec(compile(code, "docs/hub.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    (expected,) = predict(load_model(runs["googlenet"]), [images[0]])
    assert [line.split("%  ", 1)[1] for line in lines] == [c["name"] for c in expected["top"]]
    assert [float(line.split("%")[0]) for line in lines] == pytest.approx(
        [100 * c["probability"] for c in expected["top"]], abs=0.006)
