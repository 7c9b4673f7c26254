"""Model construction for the trainer.

``build_model(name, num_classes, aux_logits=True, dropout=None)`` knows three kinds of names
(see ``MODEL_NAMES``):

``googlenet``
    The network of the paper (*Going Deeper with Convolutions*, Szegedy et al. 2014), layer for
    layer as its Table 1 and the BVLC Caffe ``train_val.prototxt``: true 5x5 convolutions in the
    5x5 branches, biases and ReLU on every convolution, local response normalisation, no batch
    norm, max pools 3x3/2 with ``ceil_mode=True`` (Caffe's rounding: 224 -> 112 -> 56 -> 28 ->
    14 -> 7), dropout 0.4 before the classifier and two auxiliary classifiers on inception 4a
    and 4d. 6,998,552 parameters for 1,000 classes, 13,378,280 with the auxiliary heads.
    Implemented here (:class:`GoogLeNet`).

``googlenet_bn``
    ``torchvision.models.googlenet`` untouched (batch norm after every convolution, no LRN, 3x3
    convolutions in the "5x5" branches, a 2x2 last max pool), so that its state dict stays
    loadable by torchvision. 6,624,904 / 13,004,888 parameters for 1,000 classes.

any other torchvision classification model
    ``torchvision.models.get_model(name, weights=None, num_classes=...)``: ``alexnet``,
    ``resnet50``, ``vgg16``, ... No auxiliary heads except ``inception_v3``'s, which follow
    ``aux_logits``.

What the models return differs (a tensor, torchvision's ``GoogLeNetOutputs`` or
``InceptionOutputs``, this module's :class:`ModelOutput`); :func:`forward_with_aux` turns every
case into ``ModelOutput(logits, aux)``, with ``aux`` ordered from the shallowest head to the
deepest (``(aux1, aux2)`` = (inception 4a head, inception 4d head) for both GoogLeNets) and empty
in eval mode or when the model has no auxiliary heads.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

__all__ = [
    "MODEL_NAMES",
    "GoogLeNet",
    "ModelOutput",
    "build_model",
    "classifier_layers",
    "count_parameters",
    "forward_with_aux",
    "use_torchvision_input",
    "valid_model_names",
]

MODEL_NAMES: dict[str, str] = {
    "googlenet": "GoogLeNet as in the paper (Table 1): LRN, true 5x5 branches, no batch norm, "
    "aux heads on 4a/4d, dropout 0.4",
    "googlenet_bn": "torchvision.models.googlenet: batch norm, no LRN, 3x3 in the '5x5' branches, "
    "dropout 0.2 (state dict loadable by torchvision)",
    "<torchvision name>": "any other torchvision classification model through "
    "torchvision.models.get_model(name, weights=None, num_classes=...), e.g. alexnet, resnet50",
}
"""Supported names and what they build (keys other than ``<torchvision name>`` are literal)."""

# The paper's Table 1: name -> (in, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj).
INCEPTION_TABLE: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}

# Caffe's LRN (the BVLC prototxt: local_size 5, alpha 1e-4, beta 0.75, k left at Caffe's default 1)
# computes x / (k + alpha / n * sum_window x^2) ** beta, the same convention as PyTorch's
# LocalResponseNorm (alpha divided by the window size), so the numbers carry over unchanged and
# k = 1.0 (PyTorch's default too). AlexNet's k = 2 belongs to its own convention (alpha not divided
# by n) and is not what GoogLeNet used.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 1.0

GOOGLENET_DROPOUT = 0.4  # before the classifier (paper, Table 1 / section 5)
AUX_DROPOUT = 0.7  # in the auxiliary classifiers (paper, section 5)
CAFFE_BIAS = 0.2  # bias of every convolution and hidden FC layer in the BVLC prototxt


class ModelOutput(NamedTuple):
    """Logits and auxiliary logits (shallowest head first; empty in eval mode or without heads)."""

    logits: Tensor
    aux: tuple[Tensor, ...] = ()


class ConvReLU(nn.Module):
    """Convolution with bias, then ReLU (torchvision's BasicConv2d without the batch norm)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x), inplace=True)


class Inception(nn.Module):
    """An inception module: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3/1 max pool -> 1x1, concatenated."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
                 pool_proj: int) -> None:
        super().__init__()
        self.branch1 = ConvReLU(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(ConvReLU(in_channels, ch3x3red, 1), ConvReLU(ch3x3red, ch3x3, 3, padding=1))
        self.branch3 = nn.Sequential(ConvReLU(in_channels, ch5x5red, 1), ConvReLU(ch5x5red, ch5x5, 5, padding=2))
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), ConvReLU(in_channels, pool_proj, 1)
        )
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: 5x5/3 average pool, 1x1 conv 128 + ReLU, FC 1024 + ReLU, dropout 0.7, FC.

    On the 14x14 map of a 224x224 input the pool is the paper's 5x5 stride 3 average pool
    (windows 0-4, 3-7, 6-10, 9-13 -> 4x4). On any other map size it is an adaptive average pool
    to 4x4 (torchvision's choice), so that the FC 2048 -> 1024 still fits. The two are NOT the
    same on 14x14: adaptive pooling there uses 4x4 windows (0-3, 3-6, 7-10, 10-13), hence the
    special case. Neither has parameters, so checkpoints are unaffected.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = AUX_DROPOUT) -> None:
        super().__init__()
        self.conv = ConvReLU(in_channels, 128, 1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.dropout = nn.Dropout(p=dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] == (14, 14):
            x = F.avg_pool2d(x, kernel_size=5, stride=3)
        else:
            x = F.adaptive_avg_pool2d(x, (4, 4))
        x = torch.flatten(self.conv(x), 1)
        x = self.dropout(F.relu(self.fc1(x), inplace=True))
        return self.fc2(x)


class GoogLeNet(nn.Module):
    """GoogLeNet as in the paper's Table 1 (see the module docstring).

    ``forward`` returns the logits as a tensor in eval mode or without auxiliary heads, and
    ``ModelOutput(logits, (aux1, aux2))`` in training mode with them (aux1 on inception 4a,
    aux2 on inception 4d). Names follow torchvision's GoogLeNet where the layers correspond
    (conv1, conv2 = the 1x1 reduce, conv3 = the 3x3, inception3a..5b, aux1, aux2, fc), plus
    lrn1 / lrn2.

    Initialisation (see :meth:`reset_parameters`): as the BVLC Caffe GoogLeNet, weights
    uniform in +-sqrt(3 / fan_in), biases 0.2 except the classifiers' (0).
    """

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True, dropout: float = GOOGLENET_DROPOUT,
                 dropout_aux: float = AUX_DROPOUT) -> None:
        super().__init__()
        self.aux_logits = aux_logits
        self.conv1 = ConvReLU(3, 64, 7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.lrn1 = nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K)
        self.conv2 = ConvReLU(64, 64, 1)
        self.conv3 = ConvReLU(64, 192, 3, padding=1)
        self.lrn2 = nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(*INCEPTION_TABLE["inception3a"])
        self.inception3b = Inception(*INCEPTION_TABLE["inception3b"])
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(*INCEPTION_TABLE["inception4a"])
        self.inception4b = Inception(*INCEPTION_TABLE["inception4b"])
        self.inception4c = Inception(*INCEPTION_TABLE["inception4c"])
        self.inception4d = Inception(*INCEPTION_TABLE["inception4d"])
        self.inception4e = Inception(*INCEPTION_TABLE["inception4e"])
        self.maxpool4 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception5a = Inception(*INCEPTION_TABLE["inception5a"])
        self.inception5b = Inception(*INCEPTION_TABLE["inception5b"])
        if aux_logits:
            self.aux1: InceptionAux | None = InceptionAux(self.inception4a.out_channels, num_classes, dropout_aux)
            self.aux2: InceptionAux | None = InceptionAux(self.inception4d.out_channels, num_classes, dropout_aux)
        else:
            self.aux1 = None
            self.aux2 = None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))  # the paper's 7x7/1 average pool at 224
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(self.inception5b.out_channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the BVLC Caffe GoogLeNet (``models/bvlc_googlenet/train_val.prototxt``).

        Every weight: Caffe's ``xavier`` filler, i.e. uniform in +-sqrt(3 / fan_in) (variance
        1 / fan_in; Caffe's default ``variance_norm: FAN_IN``, not Glorot's 2 / (fan_in + fan_out)).
        Biases: 0.2 for every convolution and for the auxiliary heads' hidden FC layer, 0 for
        the three classifier layers.

        Why: this is the initialisation that trained GoogLeNet from scratch without batch norm
        (the BVLC replication of the paper), so it goes with the paper's recipe. The positive
        biases keep the ReLUs active and stop the signal from dying out over the 22 layers
        (activation std falls only ~2x from conv1 to inception 5b; with Glorot and zero biases
        it falls ~20x and the net barely moves), while the fan-in scale keeps the features
        small enough that SGD at lr 0.01 with momentum 0.9 is stable from the first step. He
        (Kaiming) normal init with zero biases was tried too (on a fixed batch of 8 toy 64x64
        images): it preserves the scale through the depth, but the top features reach a std
        ~2.5 with large positive means, the initial loss is up to 1.7x ln(classes), and the
        second momentum-SGD step at lr 0.01 blew the loss up to 7-15 before it recovered (after
        which it fit the toy batch somewhat faster than this init).
        """
        classifiers = {self.fc}
        for head in (self.aux1, self.aux2):
            if head is not None:
                classifiers.add(head.fc2)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bound = math.sqrt(3.0 / (m.weight[0].numel()))  # fan_in = in_features * kh * kw
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.constant_(m.bias, 0.0 if m in classifiers else CAFFE_BIAS)

    def forward(self, x: Tensor) -> Tensor | ModelOutput:
        x = self.maxpool1(self.conv1(x))
        x = self.lrn1(x)
        x = self.conv3(self.conv2(x))
        x = self.maxpool2(self.lrn2(x))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        with_aux = self.training and self.aux1 is not None and self.aux2 is not None
        aux1 = self.aux1(x) if with_aux else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if with_aux else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if aux1 is not None and aux2 is not None:
            return ModelOutput(x, (aux1, aux2))
        return x


def valid_model_names() -> list[str]:
    """Every name ``build_model`` accepts: ours plus torchvision's classification models."""
    tv = torchvision.models.list_models(module=torchvision.models)
    return sorted(set(tv) | {"googlenet", "googlenet_bn"})


def build_model(name: str, num_classes: int, aux_logits: bool = True, dropout: float | None = None) -> nn.Module:
    """Build an untrained model (see ``MODEL_NAMES``).

    ``aux_logits`` adds the auxiliary heads where the model has them (googlenet, googlenet_bn,
    inception_v3) and is ignored elsewhere. ``dropout=None`` keeps each model's default (0.4 for
    googlenet, torchvision's 0.2 for googlenet_bn); otherwise it sets the dropout before the
    classifier (ValueError for torchvision models whose builder has no ``dropout`` argument).
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if name == "googlenet":
        return GoogLeNet(num_classes, aux_logits=aux_logits,
                         dropout=GOOGLENET_DROPOUT if dropout is None else dropout)
    kwargs: dict = {}
    if dropout is not None:
        kwargs["dropout"] = dropout
    if name == "googlenet_bn":
        return torchvision.models.googlenet(weights=None, aux_logits=aux_logits, transform_input=False,
                                            init_weights=True, num_classes=num_classes, **kwargs)
    valid = valid_model_names()
    if name not in valid:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(valid)}")
    if name == "inception_v3":
        kwargs.update(aux_logits=aux_logits, init_weights=True)
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        if "dropout" in kwargs and "dropout" in str(e):
            raise ValueError(f"model {name!r} has no dropout setting; leave dropout=None") from e
        raise


def use_torchvision_input(model: nn.Module) -> None:
    """Give a ``googlenet_bn`` model the input convention of torchvision's published GoogLeNet
    weights: ``googlenet(weights=...)`` turns on ``transform_input``, which maps our
    ImageNet-normalised input to the [-1, 1] scaling the ported weights expect. It is not part
    of the state dict, so it is set again whenever a model that started from such weights is
    rebuilt."""
    if not isinstance(model, torchvision.models.GoogLeNet):
        raise ValueError(f"only googlenet_bn (torchvision's GoogLeNet) takes torchvision GoogLeNet weights, "
                         f"not {type(model).__name__}")
    model.transform_input = True


# The layers before inception 3a, in both GoogLeNets (conv1 7x7/2, conv2 1x1, conv3 3x3; LRN and
# pools have no parameters): what ``model.freeze: stem`` freezes.
STEM_LAYERS = ("conv1", "conv2", "conv3")


def classifier_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The layers whose outputs are the class scores, by name: ``fc`` and, when the model has
    them, the auxiliary heads' last layers (``aux1.fc2``, ``aux2.fc2``; ``AuxLogits.fc`` for
    inception_v3). For other torchvision models: the Linear layers with as many outputs as the
    last one (``fc`` for ResNets, ``classifier.6`` for VGG). These are what fine-tuning onto
    other classes starts fresh and what ``optim.head_lr_factor`` applies to."""
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linear:
        raise ValueError(f"{type(model).__name__} has no Linear classifier layer")
    classes = list(linear.values())[-1].out_features
    named = ("fc", "aux1.fc2", "aux2.fc2", "AuxLogits.fc")
    if isinstance(model, (GoogLeNet, torchvision.models.GoogLeNet, torchvision.models.Inception3)):
        return {name: linear[name] for name in named if name in linear}
    return {name: m for name, m in linear.items() if m.out_features == classes}


def stem_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The convolutions before the first inception module of either GoogLeNet, by name."""
    if not isinstance(model, (GoogLeNet, torchvision.models.GoogLeNet)):
        raise ValueError(f"the stem is defined for googlenet and googlenet_bn, not {type(model).__name__}")
    return {name: getattr(model, name) for name in STEM_LAYERS}


# The auxiliary heads' attribute names (ours and torchvision's googlenet; inception_v3), and the
# prefixes of their keys in a state dict.
AUX_HEADS = ("aux1", "aux2", "AuxLogits")
AUX_PREFIXES = tuple(f"{head}." for head in AUX_HEADS)


def _aux_modules(model: nn.Module) -> list[nn.Module]:
    """The auxiliary heads of a model (ours, torchvision's googlenet and inception_v3)."""
    heads = []
    for attr in AUX_HEADS:
        m = getattr(model, attr, None)
        if isinstance(m, nn.Module):
            heads.append(m)
    return heads


def count_parameters(model: nn.Module, include_aux: bool = True) -> int:
    """Number of parameters (shared ones once); without those of the auxiliary heads if asked."""
    params = {id(p): p.numel() for p in model.parameters()}
    if not include_aux:
        for head in _aux_modules(model):
            for p in head.parameters():
                params.pop(id(p), None)
    return sum(params.values())


def forward_with_aux(model: nn.Module, images: Tensor) -> ModelOutput:
    """Run ``model`` and return ``ModelOutput(logits, aux)`` whatever it returns.

    Handles plain tensors, our ``ModelOutput``, torchvision's ``GoogLeNetOutputs(logits,
    aux_logits2, aux_logits1)`` (reordered to ``(aux1, aux2)``) and ``InceptionOutputs(logits,
    aux_logits)``; ``None`` auxiliary outputs (e.g. a scripted model in eval mode) are dropped.
    """
    out = model(images)
    if isinstance(out, Tensor):
        return ModelOutput(out, ())
    if isinstance(out, ModelOutput):
        return ModelOutput(out.logits, tuple(a for a in out.aux if a is not None))
    fields = getattr(out, "_fields", None)
    if fields is not None:
        if "aux_logits1" in fields and "aux_logits2" in fields:  # torchvision GoogLeNetOutputs
            aux = (out.aux_logits1, out.aux_logits2)
        elif "aux_logits" in fields:  # torchvision InceptionOutputs
            aux = (out.aux_logits,)
        else:
            raise TypeError(f"unsupported model output {type(out).__name__}{fields}")
        return ModelOutput(out.logits, tuple(a for a in aux if a is not None))
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, Tensor) for t in out):
        return ModelOutput(out[0], tuple(out[1:]))
    raise TypeError(f"unsupported model output {type(out).__name__}")
