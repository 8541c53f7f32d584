"""The benchmark configuration: biotorch-style YAML sections, validated as a whole.

A config file has the sections ``experiment``, ``data``, ``model``, ``training``,
``infrastructure`` and ``evaluation`` (biotorch's layout; a biotorch benchmark file runs
unchanged). Every key, its default, its allowed values and its meaning is one row of
:data:`FIELDS`, the only place defaults are defined; :func:`defaults_markdown` renders that
table for the README. Each (sub)section is a frozen dataclass that validates itself in
``__post_init__``; :meth:`BenchmarkConfig.from_dict` validates the whole document first and
raises ONE :class:`~bio_ext.errors.ConfigError` listing every problem with its YAML path,
e.g. ``training.optimizer.lr: must be > 0, got -1``; unknown keys name the closest valid key.

Sweeps: ``model.mode.type`` may be a list of modes and ``experiment.seeds`` a list of seeds;
the runner trains every (mode, seed) pair. ``experiment.seed`` (biotorch's single seed) is used
when ``seeds`` is not given.

biotorch compatibility: mode ``backpropagation`` is ``bp``; the dataset ``cifar10_benchmark`` is
``cifar10`` with biotorch's 45k/5k holdout and crop+flip augmentation; the architectures
``le_net_mnist`` / ``le_net_cifar`` are ``le_net`` with that variant; optimizer and scheduler
names are case-insensitive (``SGD``, ``Adam``, ``RMSProp``; ``multistep_lr``); ``num_epochs`` and
``model_checkpoint`` are accepted for ``epochs`` and ``checkpoint``; ``infrastructure.gpus: 0``
uses CUDA device 0 when there is one and the CPU otherwise (with a warning) instead of failing.
biotorch's mode options: ``init`` (``xavier`` or ``kaiming``) sets the feedback initialisation
and, as biotorch's layers do, re-initialises every Linear/Conv2d weight with that scheme (xavier:
zero biases); ``constrain_weights`` rescales each converted weight to its initial norm after every
step; ``gradient_clip`` clamps every parameter gradient to [-1, 1] before the step (biotorch clamps
the layers' input gradients; this is the closest the ordinary loop allows); ``scaling_factor``
(biotorch lists it, no biotorch layer reads it) must be false.

Numbers written like ``1e-4`` (which YAML 1.1 reads as a string) are accepted where a number is
expected.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from ..errors import ConfigError

# ------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Spec:
    """One configuration key: its default, type, allowed values and meaning."""

    default: Any
    kind: str  # str, bool, int, number, mapping, list[int], list[number], str|list[str], int|list[int]; "?": or null
    doc: str
    check: Optional[Callable[[Any], bool]] = None
    expect: str = ""  # what ``check`` requires, for messages and docs
    choices: Optional[Callable[[], Sequence[str]]] = None
    aliases: Mapping[str, str] = field(default_factory=dict)  # value aliases (biotorch names)
    lower: bool = False  # compare case-insensitively


#: block-wise training with local losses: not a feedback rule, built by bio_ext.blockwise
BLOCKWISE = "bwbpf"


def _modes() -> List[str]:
    from ..modes import available_modes
    return sorted([*available_modes(), BLOCKWISE])


def _datasets() -> List[str]:
    from .data import available_datasets
    return available_datasets()


def _models() -> List[str]:
    from .models import available_models
    return available_models()


MODE_ALIASES = {"backpropagation": "bp"}
DATASET_ALIASES = {"cifar10_benchmark": "cifar10"}
ARCH_ALIASES = {"le_net_mnist": "le_net", "le_net_cifar": "le_net"}
OPTIMIZERS = ("sgd", "adam", "rmsprop")
SCHEDULERS = ("none", "multistep_lr", "cosine", "exponential")
BIOTORCH_MODE_OPTIONS = ("constrain_weights", "gradient_clip", "init", "scaling_factor")
#: the feedback is drawn from the run's seed plus this offset. The model's weights are drawn from the
#: run's seed itself; with the same seed a layer's feedback would repeat its own initial weights.
FEEDBACK_SEED_OFFSET = 1_000_003
KEY_ALIASES = {"training.hyperparameters.num_epochs": "epochs", "model.model_checkpoint": "checkpoint"}

FIELDS: Dict[str, Spec] = {
    "experiment.name": Spec("benchmark", "str", "folder of the experiment under `output_dir`",
                            lambda v: bool(v) and "/" not in v and v not in (".", ".."), "a non-empty folder name"),
    "experiment.description": Spec("", "str", "free text, copied to the summary"),
    "experiment.output_dir": Spec("runs", "str", "where experiments are written (relative to the working directory)",
                                  lambda v: bool(v), "a non-empty path"),
    "experiment.seed": Spec(0, "int", "seed of the run when `seeds` is not given (biotorch's key)",
                            lambda v: v >= 0, ">= 0"),
    "experiment.seeds": Spec(None, "list[int]?", "seeds to sweep over; every mode is trained once per seed",
                             lambda v: len(v) > 0 and all(s >= 0 for s in v) and len(set(v)) == len(v),
                             "a non-empty list of distinct ints >= 0"),
    "experiment.deterministic": Spec(False, "bool", "`torch.use_deterministic_algorithms(True)` and cuDNN "
                                     "benchmarking off (everything is seeded in any case)"),
    "data.dataset": Spec("digits", "str", "dataset name (`cifar10_benchmark`: cifar10 with biotorch's holdout "
                         "and augmentation)", choices=_datasets, aliases=DATASET_ALIASES),
    "data.dataset_path": Spec(None, "str?", "data folder; null: `../shared/data` next to the repository "
                              "(see `bio_ext.benchmark.data`)"),
    "data.target_size": Spec(None, "int?", "resize images to target_size x target_size (bilinear) when it "
                             "differs from their size; null: keep", lambda v: v >= 1, ">= 1"),
    "data.batch_size": Spec(None, "int?", "evaluation batch size; null: the training batch size",
                            lambda v: v >= 1, ">= 1"),
    "data.num_workers": Spec(0, "int", "accepted for biotorch files; data is held in memory, batches are "
                             "made in the main process", lambda v: v >= 0, ">= 0"),
    "data.val_fraction": Spec(0.1, "number", "share of the training set held out for validation "
                              "(biotorch's sampling with seed 0: the same split for every mode and seed)",
                              lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.limit": Spec(None, "int?", "keep this many training examples (quick runs, tests); null: all",
                       lambda v: v >= 1, ">= 1"),
    "data.augment": Spec(False, "bool", "training augmentation where the dataset has one (cifar10: "
                         "random crop and flip)"),
    "data.options": Spec({}, "mapping", "extra options of the dataset loader (e.g. synthetic's `num_classes`)"),
    "model.architecture": Spec("mlp", "str", "model name: mlp, cnn, le_net, resnet20/56, any torchvision "
                               "classification model (`le_net_mnist`/`le_net_cifar`: biotorch's LeNets)",
                               choices=_models, aliases=ARCH_ALIASES),
    "model.kwargs": Spec({}, "mapping", "keyword arguments of the model builder (mlp: `hidden`, `activation`)"),
    "model.pretrained": Spec(False, "bool", "accepted for biotorch files; must be false (no downloads)",
                             lambda v: v is False, "false (pretrained weights cannot be downloaded here)"),
    "model.checkpoint": Spec(None, "str?", "a `state_dict` file loaded into the model before conversion",
                             os.path.isfile, "an existing file"),
    "model.mode.type": Spec("bp", "str|list[str]", "mode, or a list of modes to compare "
                            "(`backpropagation` = bp)", choices=_modes, aliases=MODE_ALIASES),
    "model.mode.options": Spec({}, "mapping", "options for every mode of the sweep: biotorch's "
                               "`init`/`constrain_weights`/`gradient_clip`/`scaling_factor`, and the mode's own "
                               "options (e.g. GrAPE's `feedback_lr`)"),
    "model.mode.mode_options": Spec({}, "mapping", "options for one mode only: `{grape: {feedback_lr: 0.05}}`, "
                                    "merged over `options`"),
    "model.mode.convert": Spec({}, "mapping", "other `bio_ext.ConvertConfig` fields (`scale`, `conv_error`, "
                               "`init`, `error_at`, ...); `seed` (of the feedback) defaults to the run's seed + 1000003"),
    "model.loss_function.name": Spec("cross_entropy", "str", "loss", choices=lambda: ("cross_entropy",)),
    "training.hyperparameters.epochs": Spec(10, "int", "training epochs (`num_epochs` also accepted)",
                                            lambda v: v >= 1, ">= 1"),
    "training.hyperparameters.batch_size": Spec(128, "int", "training batch size", lambda v: v >= 1, ">= 1"),
    "training.optimizer.type": Spec("adam", "str", "optimizer (case-insensitive: SGD, Adam, RMSProp)",
                                    choices=lambda: OPTIMIZERS, lower=True),
    "training.optimizer.lr": Spec(1e-3, "number", "learning rate", lambda v: v > 0, "> 0"),
    "training.optimizer.weight_decay": Spec(0.0, "number", "L2 weight decay", lambda v: v >= 0, ">= 0"),
    "training.optimizer.momentum": Spec(0.9, "number", "momentum (SGD, RMSProp)", lambda v: 0 <= v < 1,
                                        "in [0, 1)"),
    "training.optimizer.betas": Spec([0.9, 0.999], "list[number]", "Adam's betas",
                                     lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "training.optimizer.epsilon": Spec(1e-8, "number", "Adam/RMSProp epsilon", lambda v: v >= 0, ">= 0"),
    "training.lr_scheduler.type": Spec("none", "str", "per-epoch schedule: none, multistep_lr (x gamma at each "
                                       "milestone), exponential (x gamma every epoch; the GrAPE seed's 0.95), "
                                       "cosine (to eta_min over t_max epochs)", choices=lambda: SCHEDULERS,
                                       aliases={"multistep": "multistep_lr", "constant": "none"}, lower=True),
    "training.lr_scheduler.gamma": Spec(0.1, "number", "decay factor", lambda v: 0 < v <= 1, "in (0, 1]"),
    "training.lr_scheduler.milestones": Spec([], "list[int]", "epochs at which multistep_lr decays",
                                             lambda v: all(m >= 0 for m in v) and list(v) == sorted(set(v)),
                                             "increasing ints >= 0"),
    "training.lr_scheduler.t_max": Spec(None, "int?", "cosine period in epochs; null: the number of epochs",
                                        lambda v: v >= 1, ">= 1"),
    "training.lr_scheduler.eta_min": Spec(0.0, "number", "cosine's final learning rate", lambda v: v >= 0, ">= 0"),
    "training.metrics.top_k": Spec(5, "int", "top-k accuracy reported besides top-1", lambda v: v >= 1, ">= 1"),
    "training.metrics.display_iterations": Spec(50, "int", "every N training steps: TensorBoard step scalars "
                                                "(loss, accuracy, lr, step time) and the alignment probe",
                                                lambda v: v >= 1, ">= 1"),
    "training.metrics.layer_alignment": Spec(True, "bool", "log per-layer angles (`bio_ext.alignment`, on a "
                                             "copy of the model) every N steps"),
    "training.metrics.weight_ratio": Spec(True, "bool", "log feedback-vs-weight norm ratios (local modes)"),
    "training.metrics.alignment_batch": Spec(128, "int", "examples of the current batch the probe uses",
                                             lambda v: v >= 1, ">= 1"),
    "training.metrics.tensorboard": Spec(True, "bool", "write TensorBoard event files"),
    "infrastructure.gpus": Spec(-1, "int|list[int]", "-1: CPU; k or [k, ...]: CUDA device k when available "
                                "(only the first is used), else the CPU with a warning",
                                lambda v: (v >= -1) if isinstance(v, int) else (len(v) > 0 and all(g >= 0 for g in v)),
                                "-1, a device index >= 0 or a non-empty list of them"),
    "infrastructure.threads": Spec(None, "int?", "torch.set_num_threads; null: leave torch's default",
                                   lambda v: v >= 1, ">= 1"),
    "evaluation.enabled": Spec(True, "bool", "evaluate on the test set after every epoch (biotorch's `evaluation: true` "
                               "or `false` is shorthand for it)"),
}

DEFAULTS: Dict[str, Any] = {path: spec.default for path, spec in FIELDS.items()}


def _d(path: str):
    default = DEFAULTS[path]
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default))
    return field(default=default)


# ------------------------------------------------------------------------------------------ checking


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_number(v):
    """A number, or a string YAML 1.1 left unparsed such as ``1e-4``; else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _closest(word: str, options: Sequence[str]) -> str:
    near = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else ""


def check_value(path: str, value: Any) -> Tuple[Any, List[str]]:
    """Normalise ``value`` for key ``path`` and return it with every problem found."""
    spec = FIELDS[path]
    kind = spec.kind
    if value is None:
        if kind.endswith("?"):
            return None, []
        return value, [f"{path}: must not be null; expected {kind}"]
    kind = kind.rstrip("?")
    got = f"got {value!r}"

    def one(v, k):
        if k == "str":
            return (v, None) if isinstance(v, str) else (v, f"must be a string, {got}")
        if k == "bool":
            return (v, None) if isinstance(v, bool) else (v, f"must be true or false, {got}")
        if k == "int":
            return (v, None) if _is_int(v) else (v, f"must be an integer, {got}")
        if k == "number":
            n = _as_number(v)
            if n is None or not math.isfinite(n):
                return v, f"must be a finite number, {got}"
            return n, None
        if k == "mapping":
            if not isinstance(v, Mapping) or not all(isinstance(key, str) for key in v):
                return v, f"must be a mapping with string keys, {got}"
            return dict(v), None
        if k.startswith("list["):
            if not isinstance(v, (list, tuple)):
                return v, f"must be a list of {k[5:-1]}s, {got}"
            out = []
            for item in v:
                x, err = one(item, k[5:-1])
                if err:
                    return v, f"must be a list of {k[5:-1]}s, {got}"
                out.append(x)
            return out, None
        raise AssertionError(k)

    if "|" in kind:
        scalar, listed = kind.split("|")
        value, err = one(value, listed if isinstance(value, (list, tuple)) else scalar)
        if err:
            err = f"must be a {scalar} or a list of them, {got}"
    else:
        value, err = one(value, kind)
    if err:
        return value, [f"{path}: {err}"]
    problems = []
    if spec.choices is not None:
        valid = list(spec.choices())
        items = value if isinstance(value, list) else [value]
        fixed = []
        for item in items:
            key = item.lower() if spec.lower else item
            key = spec.aliases.get(key, key)
            if key not in valid:
                extra = sorted(set(valid) | set(spec.aliases))
                problems.append(f"{path}: {item!r} is not one of {', '.join(extra)}{_closest(key, extra)}")
            fixed.append(key)
        if isinstance(value, list):
            if not fixed:
                problems.append(f"{path}: must not be empty")
            elif len(set(fixed)) != len(fixed):
                problems.append(f"{path}: lists {', '.join(sorted({f for f in fixed if fixed.count(f) > 1}))} twice")
            value = fixed
        else:
            value = fixed[0]
    if spec.check is not None and not problems and not spec.check(value):
        problems.append(f"{path}: must be {spec.expect}, {got}")
    return value, problems


class _Section:
    """Mixin: validate the leaf fields of a section against :data:`FIELDS`."""

    _PATH = ""
    _NESTED: Dict[str, type] = {}

    @classmethod
    def _leaves(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in cls._NESTED]

    @classmethod
    def _check(cls, values: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
        out, problems = {}, []
        for name in cls._leaves():
            if name in values:
                out[name], p = check_value(f"{cls._PATH}.{name}", values[name])
                problems += p
        return out, problems

    def __post_init__(self) -> None:
        values, problems = self._check({n: getattr(self, n) for n in self._leaves()})
        for name, v in values.items():
            object.__setattr__(self, name, v)
        for name, typ in self._NESTED.items():
            if not isinstance(getattr(self, name), typ):
                problems.append(f"{self._PATH}.{name}: must be a {typ.__name__}")
        problems += self._extra_problems()
        if problems:
            raise ConfigError(problems, what="benchmark configuration")

    def _extra_problems(self) -> List[str]:
        return []

    def to_dict(self) -> Dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, _Section) else copy.deepcopy(v)
        return out


# ------------------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class ExperimentConfig(_Section):
    _PATH = "experiment"
    name: str = _d("experiment.name")
    description: str = _d("experiment.description")
    output_dir: str = _d("experiment.output_dir")
    seed: int = _d("experiment.seed")
    seeds: Optional[List[int]] = _d("experiment.seeds")
    deterministic: bool = _d("experiment.deterministic")

    @property
    def run_seeds(self) -> List[int]:
        return list(self.seeds) if self.seeds is not None else [self.seed]


@dataclass(frozen=True)
class DataConfig(_Section):
    _PATH = "data"
    dataset: str = _d("data.dataset")
    dataset_path: Optional[str] = _d("data.dataset_path")
    target_size: Optional[int] = _d("data.target_size")
    batch_size: Optional[int] = _d("data.batch_size")
    num_workers: int = _d("data.num_workers")
    val_fraction: float = _d("data.val_fraction")
    limit: Optional[int] = _d("data.limit")
    augment: bool = _d("data.augment")
    options: Dict[str, Any] = _d("data.options")


@dataclass(frozen=True)
class ModeConfig(_Section):
    _PATH = "model.mode"
    type: Union[str, List[str]] = _d("model.mode.type")
    options: Dict[str, Any] = _d("model.mode.options")
    mode_options: Dict[str, Any] = _d("model.mode.mode_options")
    convert: Dict[str, Any] = _d("model.mode.convert")

    @property
    def modes(self) -> List[str]:
        return list(self.type) if isinstance(self.type, list) else [self.type]

    def biotorch_options(self) -> Dict[str, Any]:
        return {k: v for k, v in self.options.items() if k in BIOTORCH_MODE_OPTIONS}

    def mode_options_for(self, mode: str) -> Dict[str, Any]:
        """The mode's own options: ``options`` (biotorch's removed) updated by ``mode_options[mode]``."""
        own = {k: v for k, v in self.options.items() if k not in BIOTORCH_MODE_OPTIONS}
        own.update(self.mode_options.get(mode) or {})
        return own

    def convert_config(self, mode: str, seed: Optional[int] = None):
        """The :class:`bio_ext.ConvertConfig` of one mode of the sweep (for ``bwbpf``, the
        :class:`bio_ext.BlockwiseConfig`: its options are those of :func:`bio_ext.blockwise`)."""
        from ..config import ConvertConfig
        if mode == BLOCKWISE:
            from ..blockwise import BlockwiseConfig
            own = self.mode_options_for(mode)
            if seed is not None:
                own.setdefault("seed", seed + FEEDBACK_SEED_OFFSET)
            return BlockwiseConfig.from_dict(own)
        kwargs = dict(self.convert)
        bt = self.biotorch_options()
        if "init" in bt and "init" not in kwargs:
            kwargs["init"] = bt["init"]
        if seed is not None:
            kwargs.setdefault("seed", seed + FEEDBACK_SEED_OFFSET)
        return ConvertConfig.from_dict({**kwargs, "mode": mode, "options": self.mode_options_for(mode)})

    def _extra_problems(self) -> List[str]:
        from ..config import ConvertConfig
        from ..modes import get_mode
        p = self._PATH
        problems = []
        bt = self.biotorch_options()
        for k in ("constrain_weights", "gradient_clip", "scaling_factor"):
            if k in bt and not isinstance(bt[k], bool):
                problems.append(f"{p}.options.{k}: must be true or false, got {bt[k]!r}")
        if bt.get("scaling_factor") is True:
            problems.append(f"{p}.options.scaling_factor: must be false (no biotorch layer implements it)")
        if "init" in bt and bt["init"] not in ("xavier", "kaiming"):
            problems.append(f"{p}.options.init: {bt['init']!r} is not one of kaiming, xavier")
        modes = self.modes if all(isinstance(m, str) for m in self.modes) else []
        for m in self.mode_options:
            if m not in modes:
                problems.append(f"{p}.mode_options.{m}: {m!r} is not a mode of this sweep "
                                f"({', '.join(modes)}){_closest(m, modes)}")
            elif not isinstance(self.mode_options[m], Mapping):
                problems.append(f"{p}.mode_options.{m}: must be a mapping of options, got {self.mode_options[m]!r}")
        fields = {f.name for f in dataclasses.fields(ConvertConfig)} - {"mode", "options", "output_dim"}
        for k in self.convert:
            if k not in fields:
                problems.append(f"{p}.convert.{k}: unknown key{_closest(k, sorted(fields))}; valid keys are "
                                f"{', '.join(sorted(fields))}")
        if problems:  # the checks below build ConvertConfigs from these values
            return problems
        seen = set()
        for m in modes:
            own = self.mode_options_for(m)
            if m == BLOCKWISE:
                try:
                    self.convert_config(m, seed=0)
                except ConfigError as e:
                    for msg in e.problems:
                        key = msg.split(":", 1)[0]
                        where = f"{p}.mode_options.{m}" if key in (self.mode_options.get(m) or {}) else f"{p}.options"
                        problems.append(f"{where}.{msg} (mode {m}; options of bio_ext.blockwise)")
                continue
            for msg in get_mode(m).rule.validate_options(own):
                key = msg.split(":", 1)[0].replace("options.", "", 1)
                where = f"{p}.mode_options.{m}" if key in (self.mode_options.get(m) or {}) else f"{p}.options"
                text = f"{where}.{msg.replace('options.', '', 1)} (mode {m})"
                if text not in seen:
                    seen.add(text)
                    problems.append(text)
            try:
                self.convert_config(m, seed=0)
            except ConfigError as e:
                for msg in e.problems:
                    if msg.startswith("options.") or msg.startswith("mode:"):
                        continue
                    text = f"{p}.convert.{msg}"
                    if text not in seen:
                        seen.add(text)
                        problems.append(text)
        return problems


@dataclass(frozen=True)
class LossConfig(_Section):
    _PATH = "model.loss_function"
    name: str = _d("model.loss_function.name")


@dataclass(frozen=True)
class ModelConfig(_Section):
    _PATH = "model"
    _NESTED = {"mode": ModeConfig, "loss_function": LossConfig}
    architecture: str = _d("model.architecture")
    kwargs: Dict[str, Any] = _d("model.kwargs")
    pretrained: bool = _d("model.pretrained")
    checkpoint: Optional[str] = _d("model.checkpoint")
    mode: ModeConfig = field(default_factory=ModeConfig)
    loss_function: LossConfig = field(default_factory=LossConfig)


@dataclass(frozen=True)
class HyperparametersConfig(_Section):
    _PATH = "training.hyperparameters"
    epochs: int = _d("training.hyperparameters.epochs")
    batch_size: int = _d("training.hyperparameters.batch_size")


@dataclass(frozen=True)
class OptimizerConfig(_Section):
    _PATH = "training.optimizer"
    type: str = _d("training.optimizer.type")
    lr: float = _d("training.optimizer.lr")
    weight_decay: float = _d("training.optimizer.weight_decay")
    momentum: float = _d("training.optimizer.momentum")
    betas: List[float] = _d("training.optimizer.betas")
    epsilon: float = _d("training.optimizer.epsilon")


@dataclass(frozen=True)
class SchedulerConfig(_Section):
    _PATH = "training.lr_scheduler"
    type: str = _d("training.lr_scheduler.type")
    gamma: float = _d("training.lr_scheduler.gamma")
    milestones: List[int] = _d("training.lr_scheduler.milestones")
    t_max: Optional[int] = _d("training.lr_scheduler.t_max")
    eta_min: float = _d("training.lr_scheduler.eta_min")


@dataclass(frozen=True)
class MetricsConfig(_Section):
    _PATH = "training.metrics"
    top_k: int = _d("training.metrics.top_k")
    display_iterations: int = _d("training.metrics.display_iterations")
    layer_alignment: bool = _d("training.metrics.layer_alignment")
    weight_ratio: bool = _d("training.metrics.weight_ratio")
    alignment_batch: int = _d("training.metrics.alignment_batch")
    tensorboard: bool = _d("training.metrics.tensorboard")


@dataclass(frozen=True)
class TrainingConfig(_Section):
    _PATH = "training"
    _NESTED = {"hyperparameters": HyperparametersConfig, "optimizer": OptimizerConfig,
               "lr_scheduler": SchedulerConfig, "metrics": MetricsConfig}
    hyperparameters: HyperparametersConfig = field(default_factory=HyperparametersConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


@dataclass(frozen=True)
class InfrastructureConfig(_Section):
    _PATH = "infrastructure"
    gpus: Union[int, List[int]] = _d("infrastructure.gpus")
    threads: Optional[int] = _d("infrastructure.threads")


@dataclass(frozen=True)
class EvaluationConfig(_Section):
    _PATH = "evaluation"
    enabled: bool = _d("evaluation.enabled")


_SECTIONS = {"experiment": ExperimentConfig, "data": DataConfig, "model": ModelConfig, "training": TrainingConfig,
             "infrastructure": InfrastructureConfig, "evaluation": EvaluationConfig}


@dataclass(frozen=True)
class BenchmarkConfig:
    """A whole benchmark configuration. Build it with :meth:`from_dict`, :meth:`from_yaml` or
    :func:`load_config`; every section has the defaults of :data:`FIELDS`."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    infrastructure: InfrastructureConfig = field(default_factory=InfrastructureConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        problems = []
        for name, typ in _SECTIONS.items():
            if not isinstance(getattr(self, name), typ):
                problems.append(f"{name}: must be a {typ.__name__}")
        if not problems:
            problems = self._cross_problems()
        if problems:
            raise ConfigError(problems, what="benchmark configuration")

    def _cross_problems(self) -> List[str]:
        problems = []
        t = self.training
        if t.lr_scheduler.type == "multistep_lr" and not t.lr_scheduler.milestones:
            problems.append("training.lr_scheduler.milestones: multistep_lr needs at least one milestone, e.g. "
                            "[100, 150]")
        if self.data.dataset == "cifar10" and self.data.target_size not in (None, 32) and self.data.augment:
            problems.append("data.target_size: cifar10 augmentation crops 32x32 images; use target_size 32 or "
                            "augment: false")
        return problems

    # -------------------------------------------------------------- views
    @property
    def modes(self) -> List[str]:
        return self.model.mode.modes

    @property
    def seeds(self) -> List[int]:
        return self.experiment.run_seeds

    def runs(self) -> List[Tuple[str, int]]:
        """Every (mode, seed) pair of the sweep, modes outermost."""
        return [(m, s) for m in self.modes for s in self.seeds]

    def for_run(self, mode: str, seed: int) -> "BenchmarkConfig":
        """This configuration narrowed to one mode and one seed (what a run folder records)."""
        d = self.to_dict()
        d["model"]["mode"]["type"] = mode
        d["model"]["mode"]["mode_options"] = {k: v for k, v in d["model"]["mode"]["mode_options"].items() if k == mode}
        d["experiment"]["seed"] = seed
        d["experiment"]["seeds"] = None
        return BenchmarkConfig.from_dict(d)

    def dataset_name(self) -> str:
        return self.data.dataset

    # -------------------------------------------------------------- round trips
    def to_dict(self) -> Dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in _SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "BenchmarkConfig":
        return cls.from_dict(yaml.safe_load(text) or {})

    @classmethod
    def from_dict(cls, data: Any) -> "BenchmarkConfig":
        """Validate the whole document; raise one ConfigError listing every problem."""
        if not isinstance(data, Mapping):
            raise ConfigError([f"<document>: must be a mapping of sections ({', '.join(_SECTIONS)}), "
                               f"got {type(data).__name__}"], what="benchmark configuration")
        data = copy.deepcopy(dict(data))
        problems: List[str] = []
        _apply_biotorch_sugar(data)
        for key in data:
            if key not in _SECTIONS:
                problems.append(f"{key}: unknown section{_closest(key, list(_SECTIONS))}; valid sections are "
                                f"{', '.join(_SECTIONS)}")
        built = {}
        for name, typ in _SECTIONS.items():
            section = _build(typ, data.get(name, {}), name, problems)
            if section is not None:
                built[name] = section
        if problems:
            raise ConfigError(problems, what="benchmark configuration")
        return cls(**built)


def _apply_biotorch_sugar(data: Dict[str, Any]) -> None:
    """biotorch spellings that are not plain key renames."""
    if isinstance(data.get("evaluation"), bool):
        data["evaluation"] = {"enabled": data["evaluation"]}
    model = data.get("model")
    if isinstance(model, dict):
        arch = model.get("architecture")
        if arch in ("le_net_mnist", "le_net_cifar"):
            kwargs = model.setdefault("kwargs", {}) if isinstance(model.get("kwargs", {}), dict) else None
            if kwargs is not None:
                kwargs.setdefault("variant", arch.split("_")[-1])
    d = data.get("data")
    if isinstance(d, dict) and d.get("dataset") == "cifar10_benchmark":
        d.setdefault("augment", True)
        d.setdefault("val_fraction", 0.1)


def _build(typ: type, values: Any, path: str, problems: List[str]):
    """Check one (sub)section's keys and values, recursing into nested sections; build it when clean."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        problems.append(f"{path}: must be a mapping of keys ({', '.join(f.name for f in dataclasses.fields(typ))}), "
                        f"got {values!r}")
        return None
    values = dict(values)
    for old_path, new in KEY_ALIASES.items():
        parent, old = old_path.rsplit(".", 1)
        if parent == path and old in values:
            if new in values:
                problems.append(f"{path}.{old}: give either {old!r} or {new!r}, not both")
            values[new] = values.pop(old)
    names = [f.name for f in dataclasses.fields(typ)]
    before = len(problems)
    for key in values:
        if key not in names:
            problems.append(f"{path}.{key}: unknown key{_closest(key, names)}; valid keys are {', '.join(names)}")
    kwargs, leaf_problems = typ._check({k: v for k, v in values.items() if k in names and k not in typ._NESTED})
    problems += leaf_problems
    nested_ok = True
    for name, sub in typ._NESTED.items():
        built = _build(sub, values.get(name, {}), f"{path}.{name}", problems)
        if built is None:
            nested_ok = False
        else:
            kwargs[name] = built
    if len(problems) != before or not nested_ok:
        return None
    try:
        return typ(**kwargs)
    except ConfigError as e:
        problems += e.problems
        return None


# ------------------------------------------------------------------------------------------ loading


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars/flow) to a raw document."""
    data = copy.deepcopy(data)
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"--override {item!r}: expected KEY=VALUE, e.g. training.hyperparameters.epochs=2")
            continue
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".")]
        if not all(parts):
            problems.append(f"--override {item!r}: empty key component in {key!r}")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            problems.append(f"--override {item!r}: value is not valid YAML ({e.__class__.__name__})")
            continue
        node = data
        for i, p in enumerate(parts[:-1]):
            if p not in node or node[p] is None:
                node[p] = {}
            elif isinstance(node[p], bool) and ".".join(parts[:i + 1]) == "evaluation":
                node[p] = {"enabled": node[p]}
            if not isinstance(node[p], dict):
                problems.append(f"--override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
                break
            node = node[p]
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, what="overrides")
    return data


def read_yaml(path: str) -> Dict[str, Any]:
    """Read a YAML file; a missing file or a syntax error is a ConfigError saying so."""
    if not os.path.isfile(path):
        raise ConfigError([f"{path}: no such config file"], what="benchmark configuration")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError([f"{path}: not valid YAML: {e}"], what="benchmark configuration") from None
    return data if data is not None else {}


def load_config(path: str, overrides: Sequence[str] = ()) -> BenchmarkConfig:
    """Read, override and validate a benchmark YAML file."""
    return BenchmarkConfig.from_dict(apply_overrides(read_yaml(path), overrides))


def defaults_markdown() -> str:
    """The table of every key, its default, allowed values and meaning (the README's section)."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for path, spec in FIELDS.items():
        default = "null" if spec.default is None else yaml.safe_dump(spec.default, default_flow_style=True).strip()
        default = default.replace("\n...", "").strip()
        allowed = spec.kind.replace("?", " or null").replace("|", " or ")
        if spec.expect:
            allowed += f", {spec.expect}"
        if spec.choices is not None:
            allowed += ", one of the registered names" if spec.choices in (_models, _datasets, _modes) else \
                ", one of " + ", ".join(spec.choices())
        rows.append(f"| `{path}` | `{default}` | {allowed} | {spec.doc} |")
    return "\n".join(rows) + "\n"
