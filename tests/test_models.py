import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.googlenet import GoogLeNetOutputs
from torchvision.models.inception import InceptionOutputs

from pipeline.models import (
    INCEPTION_TABLE,
    MODEL_NAMES,
    GoogLeNet,
    ModelOutput,
    build_model,
    count_parameters,
    forward_with_aux,
    valid_model_names,
)

NUM_CLASSES = 7


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def paper():
    torch.manual_seed(0)
    return build_model("googlenet", NUM_CLASSES)


@pytest.fixture(scope="module")
def bn():
    torch.manual_seed(0)
    return build_model("googlenet_bn", NUM_CLASSES)


def _models(paper, bn):
    return {"googlenet": paper, "googlenet_bn": bn}


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "name, without_aux, with_aux",
    [("googlenet", 6_998_552, 13_378_280), ("googlenet_bn", 6_624_904, 13_004_888)],
)
def test_parameter_counts_imagenet(name, without_aux, with_aux):
    model = build_model(name, 1000)
    assert count_parameters(model) == with_aux
    assert count_parameters(model, include_aux=False) == without_aux
    no_aux = build_model(name, 1000, aux_logits=False)
    assert count_parameters(no_aux) == without_aux
    assert count_parameters(no_aux, include_aux=False) == without_aux
    assert sum(p.numel() for p in model.parameters()) == with_aux


def test_parameter_count_matches_table_1():
    """Recompute the paper net's count from Table 1 by hand (biases everywhere, LRN has none)."""

    def conv(cin, cout, k):
        return cin * cout * k * k + cout

    total = conv(3, 64, 7) + conv(64, 64, 1) + conv(64, 192, 3)
    for cin, c1, c3r, c3, c5r, c5, pp in INCEPTION_TABLE.values():
        total += conv(cin, c1, 1) + conv(cin, c3r, 1) + conv(c3r, c3, 3) + conv(cin, c5r, 1)
        total += conv(c5r, c5, 5) + conv(cin, pp, 1)
    total += 1024 * 1000 + 1000
    assert total == 6_998_552
    aux = sum(conv(cin, 128, 1) + 2048 * 1024 + 1024 + 1024 * 1000 + 1000 for cin in (512, 528))
    assert total + aux == 13_378_280


def test_count_parameters_model_without_aux_heads():
    model = build_model("resnet18", 1000)
    assert count_parameters(model) == count_parameters(model, include_aux=False) == 11_689_512


# ---------------------------------------------------------------- the paper's architecture


def test_paper_structure(paper):
    assert isinstance(paper, GoogLeNet)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) for m in paper.modules())
    lrns = [m for m in paper.modules() if isinstance(m, nn.LocalResponseNorm)]
    assert len(lrns) == 2
    for lrn in lrns:
        assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 1.0)
    convs = [m for m in paper.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 + 9 * 6 + 2
    assert all(c.bias is not None for c in convs)
    assert paper.conv1.conv.kernel_size == (7, 7) and paper.conv1.conv.stride == (2, 2)
    assert paper.conv2.conv.kernel_size == (1, 1) and paper.conv2.conv.out_channels == 64
    assert paper.conv3.conv.kernel_size == (3, 3) and paper.conv3.conv.out_channels == 192
    for pool in (paper.maxpool1, paper.maxpool2, paper.maxpool3, paper.maxpool4):
        assert (pool.kernel_size, pool.stride, pool.ceil_mode) == (3, 2, True)
    assert paper.dropout.p == 0.4
    assert paper.aux1.dropout.p == paper.aux2.dropout.p == 0.7
    for name, (cin, c1, c3r, c3, c5r, c5, pp) in INCEPTION_TABLE.items():
        block = getattr(paper, name)
        assert block.branch1.conv.in_channels == cin and block.branch1.conv.out_channels == c1
        assert block.branch2[0].conv.out_channels == c3r
        assert block.branch2[1].conv.kernel_size == (3, 3) and block.branch2[1].conv.out_channels == c3
        five = block.branch3[1].conv
        assert five.kernel_size == (5, 5) and five.padding == (2, 2), name
        assert block.branch3[0].conv.out_channels == c5r and five.out_channels == c5
        assert block.branch4[1].conv.out_channels == pp
    assert paper.aux1.conv.conv.in_channels == 512 and paper.aux2.conv.conv.in_channels == 528
    assert paper.aux1.fc1.in_features == 2048 and paper.aux1.fc1.out_features == 1024
    state = paper.state_dict()
    for key in ("conv1.conv.weight", "inception3a.branch3.1.conv.weight", "aux1.fc2.bias", "fc.weight"):
        assert key in state


def test_paper_feature_map_sizes_at_224(paper):
    """Caffe's ceil-mode pooling: 224 -> 112 -> 56 -> 28 -> 14 -> 7, and Table 1's depths."""
    shapes = {}
    hooks = [
        getattr(paper, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
        for n in ("conv1", "lrn1", "lrn2", "maxpool2", "inception3b", "maxpool3", "inception4a",
                  "inception4d", "inception4e", "maxpool4", "inception5b")
    ]
    try:
        paper.eval()
        with torch.no_grad():
            paper(torch.randn(1, 3, 224, 224))
    finally:
        for h in hooks:
            h.remove()
    assert shapes == {
        "conv1": (64, 112, 112), "lrn1": (64, 56, 56), "lrn2": (192, 56, 56), "maxpool2": (192, 28, 28),
        "inception3b": (480, 28, 28), "maxpool3": (480, 14, 14), "inception4a": (512, 14, 14),
        "inception4d": (528, 14, 14), "inception4e": (832, 14, 14), "maxpool4": (832, 7, 7),
        "inception5b": (1024, 7, 7),
    }


def test_aux_head_pools_like_the_paper():
    """5x5/3 average pool on the 14x14 map of a 224 input (adaptive 4x4 differs there), adaptive elsewhere."""
    torch.manual_seed(0)
    head = build_model("googlenet", 3).aux1.eval()
    x = torch.randn(2, 512, 14, 14)
    paper_pooled = nn.functional.avg_pool2d(x, 5, stride=3)
    adaptive = nn.functional.adaptive_avg_pool2d(x, 4)
    assert not torch.allclose(paper_pooled, adaptive, atol=1e-3)

    def fc_input(t):
        seen = []
        hook = head.fc1.register_forward_hook(lambda m, i, o: seen.append(i[0]))
        try:
            with torch.no_grad():
                head(t)
        finally:
            hook.remove()
        return seen[0]

    with torch.no_grad():
        expected = torch.flatten(head.conv(paper_pooled), 1)
        assert torch.allclose(fc_input(x), expected, atol=1e-5)
        y = torch.randn(2, 512, 4, 4)  # e.g. 64x64 input
        assert torch.allclose(fc_input(y), torch.flatten(head.conv(y), 1), atol=1e-5)


def test_paper_init_is_caffes():
    torch.manual_seed(0)
    model = build_model("googlenet", 10)
    w = model.inception4a.branch2[1].conv.weight
    bound = math.sqrt(3.0 / (96 * 3 * 3))  # fan_in of the 3x3 conv after a 96-channel reduce
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(model.conv1.conv.bias == 0.2) and torch.all(model.aux1.fc1.bias == 0.2)
    assert torch.all(model.fc.bias == 0) and torch.all(model.aux2.fc2.bias == 0)


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("name", ["googlenet", "googlenet_bn"])
@pytest.mark.parametrize("size", [224, 96, 64, 32])
def test_output_shapes(paper, bn, name, size):
    model = _models(paper, bn)[name]
    n = 2 if size == 224 else 3
    x = torch.randn(n, 3, size, size)
    with torch.no_grad():
        model.train()
        out = forward_with_aux(model, x)
        assert isinstance(out, ModelOutput)
        assert out.logits.shape == (n, NUM_CLASSES)
        assert len(out.aux) == 2 and all(a.shape == (n, NUM_CLASSES) for a in out.aux)
        model.eval()
        out = forward_with_aux(model, x)
        assert out.logits.shape == (n, NUM_CLASSES) and out.aux == ()
        assert isinstance(model(x), torch.Tensor)  # plain logits in eval mode, like torchvision


@pytest.mark.parametrize("name, smallest", [("googlenet", 31), ("googlenet_bn", 15)])
def test_smallest_resolution(paper, bn, name, smallest):
    model = _models(paper, bn)[name].train()
    with torch.no_grad():
        out = forward_with_aux(model, torch.randn(2, 3, smallest, smallest))
        assert out.logits.shape == (2, NUM_CLASSES) and len(out.aux) == 2
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 3, smallest - 1, smallest - 1))


@pytest.mark.parametrize("name", ["googlenet", "googlenet_bn"])
def test_aux_order_is_4a_then_4d(paper, bn, name):
    model = _models(paper, bn)[name].train()
    seen = {}
    hooks = [getattr(model, h).register_forward_hook(lambda m, i, o, h=h: seen.__setitem__(h, o))
             for h in ("aux1", "aux2")]
    try:
        with torch.no_grad():
            out = forward_with_aux(model, torch.randn(2, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    assert out.aux[0] is seen["aux1"] and out.aux[1] is seen["aux2"]
    assert model.aux1.conv.conv.in_channels == 512  # on inception 4a (512 channels), aux2 on 4d (528)


@pytest.mark.parametrize("name", ["googlenet", "googlenet_bn"])
def test_without_aux_heads(name):
    model = build_model(name, 5, aux_logits=False).train()
    assert model.aux1 is None and model.aux2 is None
    with torch.no_grad():
        out = forward_with_aux(model, torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 5) and out.aux == ()


@pytest.mark.parametrize("name, size", [("alexnet", 64), ("resnet18", 64)])
def test_torchvision_models(name, size):
    model = build_model(name, NUM_CLASSES)
    assert isinstance(model, getattr(torchvision.models, {"alexnet": "AlexNet", "resnet18": "ResNet"}[name]))
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            out = forward_with_aux(model, torch.randn(2, 3, size, size))
        assert out.logits.shape == (2, NUM_CLASSES) and out.aux == ()


class _Fixed(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


def test_forward_with_aux_normalises_torchvision_outputs():
    a, b, c = torch.zeros(1, 2), torch.ones(1, 2), torch.full((1, 2), 2.0)
    out = forward_with_aux(_Fixed(GoogLeNetOutputs(a, b, c)), None)  # (logits, aux_logits2, aux_logits1)
    assert out.logits is a and out.aux[0] is c and out.aux[1] is b
    out = forward_with_aux(_Fixed(InceptionOutputs(a, b)), None)
    assert out.logits is a and len(out.aux) == 1 and out.aux[0] is b
    out = forward_with_aux(_Fixed(InceptionOutputs(a, None)), None)
    assert out.logits is a and out.aux == ()
    out = forward_with_aux(_Fixed(a), None)
    assert out.logits is a and out.aux == ()
    with pytest.raises(TypeError):
        forward_with_aux(_Fixed({"logits": a}), None)


# ---------------------------------------------------------------- googlenet_bn = torchvision's


def test_googlenet_bn_is_torchvisions(bn):
    assert type(bn) is torchvision.models.GoogLeNet
    assert bn.transform_input is False
    assert bn.dropout.p == 0.2  # torchvision's default when dropout=None
    assert bn.inception3a.branch3[1].conv.kernel_size == (3, 3)  # torchvision's known deviation
    reference = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=NUM_CLASSES)
    result = reference.load_state_dict(bn.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    bn.eval()
    reference.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(bn(x), reference(x))


def test_dropout_argument():
    assert build_model("googlenet", 3, dropout=0.5).dropout.p == 0.5
    assert build_model("googlenet_bn", 3, dropout=0.5).dropout.p == 0.5
    assert build_model("googlenet", 3, dropout=0.5).aux1.dropout.p == 0.7
    with pytest.raises(ValueError, match="dropout"):
        build_model("resnet18", 3, dropout=0.5)
    with pytest.raises(ValueError, match="dropout"):
        build_model("googlenet", 3, dropout=1.5)


# ---------------------------------------------------------------- names


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        build_model("googlenet_v7", 10)
    message = str(info.value)
    assert "googlenet_v7" in message
    for name in ("googlenet", "googlenet_bn", "alexnet", "resnet50", "inception_v3", "vgg16"):
        assert name in message.split("valid names: ")[1].split(", ")
    assert "fasterrcnn_resnet50_fpn" not in message  # detection models are not classifiers
    assert set(valid_model_names()) >= {"googlenet", "googlenet_bn", "resnet18"}
    assert "googlenet" in MODEL_NAMES and "googlenet_bn" in MODEL_NAMES


def test_bad_num_classes():
    with pytest.raises(ValueError):
        build_model("googlenet", 0)


# ---------------------------------------------------------------- can it learn?


def test_paper_googlenet_starts_learning():
    """No batch norm: the init alone must let SGD (lr 0.01, momentum 0.9) fit a fixed batch.

    Eight 64x64 noise images whose class shifts the colour channels; the eval-mode loss on the
    batch must fall well below its starting value (~ln 4) within 20 steps with the aux heads on.
    """
    torch.manual_seed(0)
    model = build_model("googlenet", 4)
    generator = torch.Generator().manual_seed(1)
    y = torch.arange(8) % 4
    shift = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 1.0, -1.0], [0.0, -1.0, 1.0]])
    x = torch.randn(8, 3, 64, 64, generator=generator) + shift[y][:, :, None, None]

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return nn.functional.cross_entropy(model(x), y).item()

    start = eval_loss()
    assert abs(start - math.log(4)) < 0.3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(20):
        out = forward_with_aux(model, x)
        loss = nn.functional.cross_entropy(out.logits, y)
        loss = loss + 0.3 * sum(nn.functional.cross_entropy(a, y) for a in out.aux)
        optimizer.zero_grad()
        loss.backward()
        assert math.isfinite(loss.item())
        optimizer.step()
    end = eval_loss()
    assert end < 0.75 * start, (start, end)
