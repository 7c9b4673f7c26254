"""The run configuration: typed sections, YAML files, ``key=value`` overrides, validation.

Every key has a type and a default here; a YAML recipe only states what differs. Loading
fails with one message naming the offending key (unknown key, wrong type, value out of
range) before anything starts.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imaging.specs import INTERPOLATIONS

REPO = Path(__file__).resolve().parents[1]  # recipes are found relative to it too
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# torch.compile's backends: inductor generates kernels (C++ on the CPU, Triton on CUDA); aot_eager
# traces forward and backward without generating code (seconds instead of minutes: tests, debugging).
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# train.collective_timeout_s when null: a checkpoint write is the longest wait of an eager run;
# compilation (the first step, and the recompiles of evaluation) takes minutes on many ranks.
COLLECTIVE_TIMEOUT_S = {"eager": 300.0, "compiled": 1800.0}
FREEZE_CHOICES = ("none", "stem", "all_but_head")
TRACKERS = ("tensorboard", "mlflow", "wandb", "aim")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key or path."""


@dataclass
class ModelConfig:
    name: str = "googlenet"  # googlenet (the paper's), googlenet_bn (torchvision's), or any torchvision model
    aux_logits: bool = True
    aux_weight: float = 0.3  # total loss = main + aux_weight * (aux1 + aux2)
    dropout: float | None = None  # None: the model's default (0.4 for the paper's GoogLeNet)
    channels_last: bool = False
    compile: bool = False  # torch.compile the DDP-wrapped model and the input transform (CUDA and CPU)
    compile_mode: str = "default"  # torch.compile's mode: default, reduce-overhead (CUDA graphs), max-autotune, ...
    compile_backend: str = "inductor"  # inductor, or aot_eager/eager (no code generation: fast to compile)
    # Start from trained weights (docs/fine-tuning.md): a run directory (its best checkpoint), a
    # checkpoint directory, a state dict exported by pipeline.inference.export, or torchvision's
    # GoogLeNet file (googlenet_bn). With other classes than the data's, the classifier layers start fresh.
    weights: str | None = None
    freeze: str = "none"  # none, stem (the convolutions before inception 3a), all_but_head (train only the classifiers)
    # googlenet_bn: map the normalised input to the [-1, 1] scaling torchvision's published weights
    # expect. null: on when model.weights starts from them (the trainer writes what it chose).
    transform_input: bool | None = None


@dataclass
class AugmentConfig:
    crop: bool = True  # random-resized crop; False: the evaluation transform (resize + centre crop)
    crop_area: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    interpolations: list[str] = field(default_factory=lambda: list(INTERPOLATIONS))
    flip: bool = True
    brightness: list[float] | None = field(default_factory=lambda: [0.5, 1.5])  # null: off
    contrast: list[float] | None = field(default_factory=lambda: [0.5, 1.5])
    saturation: list[float] | None = field(default_factory=lambda: [0.5, 1.5])
    random_order: bool = True
    lighting_std: float = 0.0  # AlexNet PCA lighting noise (0.1 in the paper era)


@dataclass
class DataConfig:
    format: str = "webdataset"  # or ffcv (.beton files from 'python -m data_prep ffcv'; needs the ffcv extra)
    ffcv_os_cache: bool = True  # FFCV: read through the page cache (false: FFCV's own process cache)
    dir: str | None = None  # prepared shards (with manifest.json): a folder, s3://, gs:// or https://; null: the demo
    demo_root: str = "demo_data"  # where the demo data is prepared on first use
    image_size: int = 224
    eval_resize: int | None = None  # shorter side before the centre crop; null: image_size * 256 / 224
    batch_size: int = 32  # per process
    eval_batch_size: int | None = None  # null: 2 x batch_size
    workers: int | None = 4  # loader processes per training process; null: this host's cores per local process
    # webdataset: shards decoded by loader workers every epoch; memory: decoded once into (device)
    # memory, cropped there (datasets that fit: CIFAR, STL-10; see pipeline/data/memory_input.py);
    # dali: shards decoded and augmented by NVIDIA DALI, on the GPU (nvJPEG) or, without CUDA, on
    # DALI's CPU operators (the dali extra; see pipeline/data/dali_input.py)
    loader: str = "webdataset"
    # dali on a GPU: the share of JPEGs sent to the GPU's hardware JPEG decoder (A100, H100), the
    # rest to nvJPEG's CUDA decoder; benchmarks/gpu_report.py measures 0 against 1
    dali_hw_decoder_load: float = 0.0
    shuffle_buffer: int = 2000  # samples, on top of the global shuffle of the shards and shard order
    interleave_shards: int = 4  # shards each loader worker reads at once, so that neighbours differ per epoch
    on_bad_sample: str = "stop"  # a sample that cannot be read: stop naming it, or skip it and record it
    max_skipped_fraction: float = 0.01  # skip: stop once more of an epoch's training samples were skipped
    # Shards in an object store (docs/object-storage.md): how long a failing or stalling store is
    # retried before the run stops (exit 3, checkpoint intact), and an optional local cache of
    # whole shards, filled by the first epoch and read by the next ones.
    remote_retry_s: float = 120.0
    cache_dir: str | None = None  # null: no cache, every epoch streams
    cache_max_gb: float = 200.0  # ImageNet's shards: about 150 GB
    # free space the cache always leaves on its disk (checkpoints, compiler caches); null: 10% of the disk
    cache_min_free_gb: float | None = None
    requester_pays: bool = False  # the bucket bills the reader (S3 and GCS requester-pays buckets)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    lr: float = 0.01  # at lr_base_batch images per update; scaled to the real one (see lr_scaling)
    lr_base_batch: int = 256  # the batch (all processes x batch_size x grad_accum) that lr is right for
    lr_scaling: str = "linear"  # linear, sqrt or none: how lr follows the real batch
    # The largest batch the recipe's references trained at with this lr rule; beyond it the run
    # warns (linear scaling held to 8,192 images on ImageNet in Goyal et al. 2017). null: no limit stated.
    lr_max_batch: int | None = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    decay_bias_and_norm: bool = True  # false: no weight decay on biases and normalisation layers
    bias_lr_factor: float = 1.0  # biases learn at this x lr (Caffe's lr_mult: 2 in BVLC's GoogLeNet)
    head_lr_factor: float = 1.0  # the classifier layers learn at this x lr (fine-tuning: a fresh head, e.g. 10)
    label_smoothing: float = 0.0
    grad_accum: int = 1
    clip_grad_norm: float | None = None


@dataclass
class ScheduleConfig:
    name: str = "step"  # step (x gamma every step_epochs; the paper's 0.96 every 8), cosine, poly, constant
    epochs: int = 30
    # Linear warm-up from warmup_start_factor x lr. null: as the batch needs it: none where the
    # lr is scaled up at most 2x, else Goyal et al.'s 5 epochs (at most a tenth of the run).
    warmup_epochs: float | None = None
    warmup_start_factor: float = 0.1
    step_epochs: float = 8.0  # the paper: 8; ResNet-style: 30
    gamma: float = 0.96  # the paper: 0.96; ResNet-style: 0.1
    min_lr: float = 0.0  # cosine floor
    power: float = 0.5  # poly: lr x (1 - update/total)^power (BVLC's quick_solver: 0.5)


@dataclass
class EmaConfig:
    enabled: bool = False
    horizon_epochs: float = 2.0  # time constant of the average, in epochs; the per-update decay follows from the batch
    every: int = 1  # update the average every N optimizer steps
    # Warm the decay up as timm does, min(decay, (1 + n) / (10 + n)) at the n-th average, so that
    # the average follows the weights early instead of keeping the random initial ones.
    warmup: bool = True


@dataclass
class TrainConfig:
    mixed_precision: str = "no"  # no, fp16, bf16
    eval_every_epochs: int = 1
    checkpoint_every_steps: int = 0  # 0: at each epoch end only
    keep_checkpoints: int = 2  # the last K, plus the best by validation top-1 error
    log_every_steps: int = 20
    image_grid: bool = True  # a grid of augmented training images once per epoch
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests)
    # Where the scalars go (docs/logging.md): any of tensorboard, mlflow, wandb, aim, through
    # Accelerate's trackers; metrics.jsonl is always written.
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    tracker_project: str | None = None  # MLflow experiment, W&B project, Aim experiment; null: googlenet
    # How long a process waits in a collective for the others before the job ends (a dead node,
    # a hung process). It must cover the longest legitimate wait: a checkpoint write, compilation.
    # null: 300 s, or 1800 s with model.compile (see COLLECTIVE_TIMEOUT_S).
    collective_timeout_s: float | None = None
    # Every N steps the processes agree on whether a stop signal arrived (without waiting for
    # the device); a signal is acted on within 2N steps, or at the end of the epoch.
    preemption_poll_steps: int = 10
    # Profile this many steps with torch.profiler after a short warm-up: a trace (Perfetto,
    # chrome://tracing) in the run directory and a table of where a step's time goes. 0: off.
    profile_steps: int = 0


@dataclass
class Config:
    name: str = "demo"  # the run directory is output_dir/name
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def collective_timeout_s(self) -> float:
        """``train.collective_timeout_s``, or its default for an eager or a compiled run."""
        if self.train.collective_timeout_s is not None:
            return self.train.collective_timeout_s
        return COLLECTIVE_TIMEOUT_S["compiled" if self.model.compile else "eager"]


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


@dataclass(frozen=True)
class Override:
    """A ``key=value`` from the command line: its text, and the text read as YAML. A key whose
    type is str takes the text as typed (``name=2024``, ``train.mixed_precision=no``)."""

    text: str
    parsed: Any


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2's booleans (true/false only): in YAML 1.1, ``no``, ``off`` and ``yes`` are
    booleans, so ``mixed_precision: no`` (Accelerate's own spelling) would not be a string."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


YAML11_BOOLEANS = {"yes": True, "no": False, "on": True, "off": False, "y": True, "n": False}


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)


def _accepts_str(tp) -> bool:
    return tp is str or str in typing.get_args(tp)


def _coerce(value: Any, tp, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int accepted for float), or raise."""
    if isinstance(value, Override):  # a number or a boolean where a string is wanted: the text as typed
        scalar = isinstance(value.parsed, (bool, int, float))
        value = value.text if _accepts_str(tp) and scalar else value.parsed
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is bool and isinstance(value, str) and value.lower() in YAML11_BOOLEANS:  # as YAML 1.1 reads them
        return YAML11_BOOLEANS[value.lower()]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if (tp in (int, float) and isinstance(value, bool)) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


# Keys and values that older recipes used, with what replaced them.
REPLACED_KEYS = {
    "ema.decay": "ema.horizon_epochs (the average's time constant in epochs; the per-update decay is "
                 "derived from the real batch, e.g. 0.9999 per update at 256 images is 2 epochs of ImageNet)",
}
REPLACED_VALUES = {
    ("schedule.name", "paper"): "schedule.name: 'paper' is now 'step' (x gamma every step_epochs; "
                                "gamma 0.96 and step_epochs 8, the paper's, are its defaults)",
}


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            if where in REPLACED_KEYS:
                raise ConfigError(f"{where}: replaced by {REPLACED_KEYS[where]}")
            raise ConfigError(f"unknown key {where!r} (valid: {', '.join(sorted(names))})")
    instance = cls()
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else key
        text = value.text if isinstance(value, Override) else value
        if isinstance(text, str) and (where, text) in REPLACED_VALUES:
            raise ConfigError(REPLACED_VALUES[where, text])
        setattr(instance, key, _coerce(value, hints[key], where))
    return instance


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.lr=0.02")
    key, raw = text.split("=", 1)
    raw = raw.strip()
    return key.strip().split("."), Override(raw, read_yaml(raw) if raw else None)


def _merge(base: dict, path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            values = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for text in overrides:
        _merge(values, *_parse_override(text))
    config = _build(Config, values)
    validate(config)
    return config


def _check(condition: bool, key: str, value, expectation: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {value!r} is out of range ({expectation})")


def _check_range(pair, key: str, low: float, high: float | None = None) -> None:
    if pair is None:
        return
    _check(len(pair) == 2 and low <= pair[0] <= pair[1] and (high is None or pair[1] <= high),
           key, pair, f"[lo, hi] with {low} <= lo <= hi" + (f" <= {high}" if high is not None else ""))


def validate(c: Config) -> None:
    """Ranges and choices; the existence of the shards is checked when the data is opened."""
    _check(c.name and "/" not in c.name, "name", c.name, "a non-empty directory name")
    _check(c.model.aux_weight >= 0, "model.aux_weight", c.model.aux_weight, ">= 0")
    _check(c.model.dropout is None or 0 <= c.model.dropout < 1, "model.dropout", c.model.dropout, "[0, 1)")
    _check(c.model.weights is None or c.model.weights.strip() != "", "model.weights", c.model.weights, "null or a file path")
    _check(c.model.freeze in FREEZE_CHOICES, "model.freeze", c.model.freeze, ", ".join(FREEZE_CHOICES))
    _check(c.data.format in ("webdataset", "ffcv"), "data.format", c.data.format, "webdataset or ffcv")
    _check(c.data.image_size >= 16, "data.image_size", c.data.image_size, ">= 16")
    _check(c.data.eval_resize is None or c.data.eval_resize >= c.data.image_size,
           "data.eval_resize", c.data.eval_resize, ">= data.image_size")
    _check(c.data.batch_size >= 1, "data.batch_size", c.data.batch_size, ">= 1")
    _check(c.data.eval_batch_size is None or c.data.eval_batch_size >= 1,
           "data.eval_batch_size", c.data.eval_batch_size, ">= 1")
    _check(c.data.workers is None or c.data.workers >= 0, "data.workers", c.data.workers, ">= 0 or null")
    _check(c.data.loader in ("webdataset", "memory", "dali"), "data.loader", c.data.loader,
           "webdataset, memory or dali")
    _check(c.data.loader == "webdataset" or c.data.format == "webdataset", "data.loader", c.data.loader,
           "webdataset with data.format ffcv (the memory and DALI loaders read shards)")
    _check(0 <= c.data.dali_hw_decoder_load <= 1, "data.dali_hw_decoder_load", c.data.dali_hw_decoder_load, "[0, 1]")
    _check(c.data.shuffle_buffer >= 0, "data.shuffle_buffer", c.data.shuffle_buffer, ">= 0")
    _check(c.data.remote_retry_s >= 0, "data.remote_retry_s", c.data.remote_retry_s, ">= 0")
    _check(c.data.cache_max_gb > 0, "data.cache_max_gb", c.data.cache_max_gb, "> 0")
    _check(c.data.cache_min_free_gb is None or c.data.cache_min_free_gb >= 0, "data.cache_min_free_gb",
           c.data.cache_min_free_gb, ">= 0 (or null: 10% of the cache's disk)")
    _check(c.data.interleave_shards >= 1, "data.interleave_shards", c.data.interleave_shards, ">= 1")
    _check(c.data.on_bad_sample in ("stop", "skip"), "data.on_bad_sample", c.data.on_bad_sample, "stop or skip")
    _check(0 <= c.data.max_skipped_fraction <= 1, "data.max_skipped_fraction", c.data.max_skipped_fraction, "[0, 1]")
    a = c.data.augment
    _check_range(a.crop_area, "data.augment.crop_area", 1e-6, 1.0)
    _check_range(a.crop_ratio, "data.augment.crop_ratio", 1e-6)
    _check(bool(a.interpolations) and set(a.interpolations) <= set(INTERPOLATIONS),
           "data.augment.interpolations", a.interpolations, f"a non-empty subset of {list(INTERPOLATIONS)}")
    for name in ("brightness", "contrast", "saturation"):
        _check_range(getattr(a, name), f"data.augment.{name}", 0.0)
    _check(a.lighting_std >= 0, "data.augment.lighting_std", a.lighting_std, ">= 0")
    o = c.optim
    _check(o.lr > 0, "optim.lr", o.lr, "> 0")
    _check(o.lr_base_batch >= 1, "optim.lr_base_batch", o.lr_base_batch, ">= 1")
    _check(o.lr_max_batch is None or o.lr_max_batch >= o.lr_base_batch, "optim.lr_max_batch", o.lr_max_batch,
           "null or >= optim.lr_base_batch")
    _check(o.lr_scaling in ("linear", "sqrt", "none"), "optim.lr_scaling", o.lr_scaling, "linear, sqrt or none")
    _check(o.head_lr_factor > 0, "optim.head_lr_factor", o.head_lr_factor, "> 0")
    _check(o.bias_lr_factor > 0, "optim.bias_lr_factor", o.bias_lr_factor, "> 0")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "[0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    _check(0 <= o.label_smoothing < 1, "optim.label_smoothing", o.label_smoothing, "[0, 1)")
    _check(o.grad_accum >= 1, "optim.grad_accum", o.grad_accum, ">= 1")
    _check(o.clip_grad_norm is None or o.clip_grad_norm > 0, "optim.clip_grad_norm", o.clip_grad_norm, "> 0")
    s = c.schedule
    _check(s.name in ("step", "cosine", "poly", "constant"), "schedule.name", s.name, "step, cosine, poly or constant")
    _check(s.epochs >= 1, "schedule.epochs", s.epochs, ">= 1")
    _check(s.warmup_epochs is None or 0 <= s.warmup_epochs < s.epochs, "schedule.warmup_epochs", s.warmup_epochs,
           "null or [0, schedule.epochs)")
    _check(0 < s.warmup_start_factor <= 1, "schedule.warmup_start_factor", s.warmup_start_factor, "(0, 1]")
    _check(s.step_epochs > 0, "schedule.step_epochs", s.step_epochs, "> 0")
    _check(0 < s.gamma <= 1, "schedule.gamma", s.gamma, "(0, 1]")
    _check(0 <= s.min_lr < o.lr, "schedule.min_lr", s.min_lr, "[0, optim.lr)")
    _check(s.power > 0, "schedule.power", s.power, "> 0")
    _check(c.ema.horizon_epochs > 0, "ema.horizon_epochs", c.ema.horizon_epochs, "> 0")
    _check(c.ema.every >= 1, "ema.every", c.ema.every, ">= 1")
    t = c.train
    _check(t.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision", t.mixed_precision, "no, fp16 or bf16")
    _check(t.eval_every_epochs >= 1, "train.eval_every_epochs", t.eval_every_epochs, ">= 1")
    _check(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", t.checkpoint_every_steps, ">= 0")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, ">= 1")
    _check(t.log_every_steps >= 1, "train.log_every_steps", t.log_every_steps, ">= 1")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, ">= 1")
    _check(bool(t.log_with) and len(set(t.log_with)) == len(t.log_with) and set(t.log_with) <= set(TRACKERS),
           "train.log_with", t.log_with, f"a list of distinct names among {', '.join(TRACKERS)}")
    _check(t.preemption_poll_steps >= 1, "train.preemption_poll_steps", t.preemption_poll_steps, ">= 1")
    _check(t.profile_steps >= 0, "train.profile_steps", t.profile_steps, ">= 0 (0: no profile)")
    _check(c.model.compile_mode in COMPILE_MODES, "model.compile_mode", c.model.compile_mode, ", ".join(COMPILE_MODES))
    _check(c.model.compile_backend in COMPILE_BACKENDS, "model.compile_backend", c.model.compile_backend,
           ", ".join(COMPILE_BACKENDS))
    _check(t.collective_timeout_s is None or t.collective_timeout_s >= 1, "train.collective_timeout_s",
           t.collective_timeout_s, "null or >= 1")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def recipe_path(path: str) -> Path:
    """A recipe path as given, or else relative to the repository (``configs/NAME.yaml``)."""
    given = Path(path)
    if given.is_file() or given.is_absolute() or not (REPO / given).is_file():
        return given
    return REPO / given
