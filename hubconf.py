"""torch.hub entry points of this repository (docs/hub.md; the logic is pipeline/inference/hub.py).

    model = torch.hub.load(".", "googlenet", source="local", weights="runs/demo")
    model = torch.hub.load("OWNER/REPO", "googlenet_bn", weights="runs/NAME", ema=True)  # from your fork on GitHub

This project publishes no weights to download: ``weights`` is a run of your own.
"""

# What loading imports (checked by torch.hub before an entry point runs; the project's modules are
# imported inside the entry points so that a missing one is reported by name; tests/test_hub.py
# checks the list against their imports). accelerate: reading a run goes through the trainer's
# checkpoint module (pipeline.train.checkpoint -> pipeline.ops.launch), which imports it.
dependencies = ["torch", "torchvision", "safetensors", "yaml", "numpy", "PIL", "accelerate"]


def googlenet(weights=None, *, checkpoint="best", ema=False, device="cpu", num_classes=None, aux_logits=None):
    """GoogLeNet as in the paper (*Going Deeper with Convolutions*, Table 1): LRN, true 5x5
    convolutions, no batch norm, auxiliary heads on inception 4a and 4d, dropout 0.4.

    weights: None (untrained, as torchvision's ``pretrained=False``), or the weights of a run of
        this project: a run directory (its best checkpoint), a checkpoint directory
        (``RUN/checkpoints/step-N``), or a state dict written by
        ``python -m pipeline.inference.export --format state_dict`` (``FILE.pth``, with its
        ``FILE.pth.json`` beside it). No weights are downloaded.
    checkpoint: for a run directory: ``"best"`` (as its ``best.json`` names it), ``"last"``, or
        one of its checkpoint directories.
    ema: the exponential moving average of the weights (runs trained with ``ema.enabled``).
    device: where the model goes.
    num_classes, aux_logits: for ``weights=None`` (defaults 1000 and True); with weights they
        come from the weights, and given values must agree.

    Returns the model in eval mode (its output: the logits, [N, classes]) with ``model.classes``
    (class names in index order), ``model.class_ids`` (the manifest's ids, e.g. wnids),
    ``model.transforms`` (a PIL image -> the normalised float tensor [3, S, S] the trainer
    validates on) and ``model.meta`` (name, source, checkpoint, ema, image_size, eval_resize).
    Weights of the other network, or paths that are not a run, checkpoint or export, raise a
    ValueError naming the path.
    """
    from pipeline.inference.hub import load

    return load("googlenet", weights, checkpoint=checkpoint, ema=ema, device=device, num_classes=num_classes,
                aux_logits=aux_logits)


def googlenet_bn(weights=None, *, checkpoint="best", ema=False, device="cpu", num_classes=None, aux_logits=None):
    """GoogLeNet with batch normalisation: ``torchvision.models.googlenet`` unchanged (batch norm
    after every convolution, no LRN, 3x3 convolutions in the "5x5" branches, dropout 0.2).

    Takes the same arguments as ``googlenet`` and returns the same attributes (``classes``,
    ``class_ids``, ``transforms``, ``meta``); see ``torch.hub.help(..., "googlenet")``.
    weights: None (untrained), a run directory, a checkpoint directory, or an exported state dict
    (``FILE.pth`` with ``FILE.pth.json``) of a ``googlenet_bn`` run. For torchvision's published
    ImageNet weights use ``torch.hub.load("pytorch/vision", "googlenet", weights="IMAGENET1K_V1")``.
    """
    from pipeline.inference.hub import load

    return load("googlenet_bn", weights, checkpoint=checkpoint, ema=ema, device=device, num_classes=num_classes,
                aux_logits=aux_logits)
