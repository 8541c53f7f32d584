"""The benchmark configuration: biotorch-style YAML sections, validated as a whole.

A config file has the sections ``experiment``, ``data``, ``model``, ``training``,
``infrastructure`` and ``evaluation`` (biotorch's layout; a biotorch benchmark file runs
unchanged, by the rules of :mod:`bio_ext.benchmark.biotorch`). Every key, its default, its
allowed values and its meaning is one row of :data:`~bio_ext.benchmark.fields.FIELDS`, the only
place defaults are defined. Each (sub)section is a frozen dataclass that validates itself in
``__post_init__``; :meth:`BenchmarkConfig.from_dict` validates the whole document first and
raises ONE :class:`~bio_ext.errors.ConfigError` listing every problem with its YAML path,
e.g. ``training.optimizer.lr: must be > 0, got -1``; unknown keys name the closest valid key.

Numbers: files and ``--override`` values are read by :func:`~bio_ext.benchmark.yamlio.yaml_load`, which resolves plain
scalars such as ``1e-3`` or ``5E+2`` to floats as YAML 1.2 does (PyYAML follows YAML 1.1 and
leaves them strings, which ``mode_options`` and ``convert`` would refuse); quoted scalars stay
strings. ``model.mode.convert.scale`` must be a finite positive number at most
:data:`MAX_SCALE`, checked here so that ``--check`` refuses what ``convert`` cannot draw.

Sweeps: ``model.mode.type`` may be a list of modes and ``experiment.seeds`` a list of seeds;
the runner trains every (mode, seed) pair. ``experiment.seed`` (biotorch's single seed) is used
when ``seeds`` is not given. An ``--override`` of ``model.mode.type`` that leaves a mode out of the
sweep drops the file's ``mode_options`` of that mode, with a note in the log
(:func:`apply_overrides`); in the file itself, options for a mode it does not train are an error.
A ``mode_options`` name that is no registered mode at all is always an error.

Why not pydantic (evaluated 2026-12-02, issue 13 item 8, with pydantic 2.13.4 / pydantic-core 2.46.4)
-----------------------------------------------------------------------------------------------------
A prototype of the ``experiment`` and ``training`` sections as ``BaseModel`` classes
(``extra="forbid"``, ``Field(gt=0)``, ``Literal``) fed a document with six mistakes gives:

* YAML paths and every problem at once: yes for field-level problems (``loc`` is
  ``('training', 'optimizer', 'lr')``, list items included), as here.
* the closest valid key: no. An unknown key is "Extra inputs are not permitted", with no
  suggestion and no list of valid keys; a wrong name is "Input should be 'sgd', 'adam' or
  'rmsprop'" without the value given. Both need a formatter of ``ValidationError`` with difflib,
  what :func:`~bio_ext.benchmark.fields.did_you_mean` does now.
* typing: lax mode (the default) silently takes ``epochs: "5"`` as 5 and ``epochs: true`` as 1,
  which this schema refuses; strict mode refuses the YAML 1.1 strings (``lr: 1e-3``) this schema
  takes as numbers, so a custom number type is needed either way.
* what stays hand-written in any case: choices read from registries at validation time (modes,
  datasets, models a user registers; ``Literal`` is static), biotorch's aliases and case rules,
  and the cross-field checks (``mode_options`` naming the sweep's modes, each mode's options and
  :class:`~bio_ext.config.ConvertConfig` / ``BlockwiseConfig`` built and checked at their YAML
  paths, the ``scale`` bound). In pydantic those are model validators, each raising one error at
  the section's path: several problems at their own paths (``model.mode.mode_options.bwbpf.blocks``
  and ``...isolate`` together) need a ``ValidationError`` assembled by hand.
* code size: the generic part that pydantic would replace is about 200 of the 771 lines of
  ``schema.py`` and ``fields.py`` (the type and choice checks, the section mixin, the unknown-key
  walk in ``_build``); the rest is the key table (defaults, docs, bounds: the README's table is generated from
  it) and the domain checks above, needed either way. The adapters pydantic would need (message
  formatter with suggestions, YAML number type, registry-choice and alias validators) are of the
  same order, so the code would not get clearly smaller.
* dependency cost: pydantic, pydantic-core (a compiled Rust extension, per-platform wheels),
  annotated-types and typing-inspection, about 9 MB installed and 0.17 s to import; none is a
  dependency of bio_ext today (pydantic happens to be installed here), and a hard pin on v2
  conflicts with environments held on pydantic v1.

Decision: keep the hand-written validation. Revisit if the configuration needs a JSON Schema or
user-defined sections; a JSON Schema could also be generated from :data:`FIELDS`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from ..blockwise import BlockwiseConfig
from ..config import ConvertConfig
from ..errors import ConfigError, Problem
from ..modes import get_mode
from . import biotorch
# the table of keys, re-exported: the configuration's names are imported from here
from .fields import (BLOCKWISE, DEFAULTS, FEEDBACK_SEED_OFFSET, FIELDS, OPTIMIZERS, SCHEDULERS,  # noqa: F401
                     Spec, check_value, defaults_markdown, did_you_mean)
# reading files and overrides, re-exported: the loading names are imported from here too
from .yamlio import apply_overrides, read_yaml, yaml_load  # noqa: F401

#: the largest ``model.mode.convert.scale`` taken: the feedback is drawn in float32, whose largest
#: value is about 3.4e38, as uniform(-b, b) with ``b`` up to ``sqrt(3) * scale``; beyond this bound
#: drawing it fails (torch's "from is out of bounds") or gives infinite feedback
MAX_SCALE = 1e37


def _d(path: str):
    """The dataclass field of key ``path``, with its default from the table."""
    default = DEFAULTS[path]
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default))
    return field(default=default)


# ------------------------------------------------------------------------------------------ problems


def _problem_path(problem: str) -> str:
    """The path a problem names: a :class:`~bio_ext.errors.Problem`'s own, else the text before
    the first colon of a plain string."""
    if isinstance(problem, Problem):
        return problem.path
    return problem.split(":", 1)[0]


def _option_problem(problem: str) -> Tuple[str, str]:
    """``(key, "key: message")`` of a problem with a mode's options, its leading ``options.`` removed."""
    if isinstance(problem, Problem):
        key = problem.path[len("options."):] if problem.path.startswith("options.") else problem.path
        return key, (f"{key}: {problem.message}" if key else problem.message)
    return problem.split(":", 1)[0].replace("options.", "", 1), problem.replace("options.", "", 1)


def _about_the_mode(problem: str) -> bool:
    """A ConvertConfig problem with the mode or its options (reported from the mode's own check)."""
    if isinstance(problem, Problem):
        return problem.path == "mode" or problem.path.startswith("options.")
    return problem.startswith("options.") or problem.startswith("mode:")


# ------------------------------------------------------------------------------------------ sections


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
    test_limit: Optional[int] = _d("data.test_limit")
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
        """biotorch's options of ``options`` (the runner's, see :mod:`bio_ext.benchmark.biotorch`)."""
        return biotorch.split_options(self.options)[0]

    def mode_options_for(self, mode: str) -> Dict[str, Any]:
        """The mode's own options: ``options`` (biotorch's removed) updated by ``mode_options[mode]``."""
        own = biotorch.split_options(self.options)[1]
        own.update(self.mode_options.get(mode) or {})
        return own

    def convert_config(self, mode: str, seed: Optional[int] = None):
        """The :class:`bio_ext.ConvertConfig` of one mode of the sweep (for ``bwbpf``, the
        :class:`bio_ext.BlockwiseConfig`: its options are those of :func:`bio_ext.blockwise`)."""
        if mode == BLOCKWISE:
            own = self.mode_options_for(mode)
            if seed is not None:
                own.setdefault("seed", seed + FEEDBACK_SEED_OFFSET)
            return BlockwiseConfig.from_dict(own)
        kwargs = dict(self.convert)
        biotorch.convert_defaults(self.biotorch_options(), kwargs)
        if seed is not None:
            kwargs.setdefault("seed", seed + FEEDBACK_SEED_OFFSET)
        return ConvertConfig.from_dict({**kwargs, "mode": mode, "options": self.mode_options_for(mode)})

    def _extra_problems(self) -> List[str]:
        problems = self._shape_problems()
        if problems:  # the checks below build ConvertConfigs from these values
            return problems
        modes = self.modes if all(isinstance(m, str) for m in self.modes) else []
        seen = set()  # the modes of a sweep share ``options`` and ``convert``: each problem once
        for m in modes:
            for text in self._mode_problems(m):
                if m == BLOCKWISE or text not in seen:
                    seen.add(text)
                    problems.append(text)
        return problems

    def _shape_problems(self) -> List[str]:
        """biotorch's options, ``mode_options`` naming the sweep's modes, and ``convert``'s keys."""
        p = self._PATH
        problems = biotorch.option_problems(self.biotorch_options(), f"{p}.options")
        modes = self.modes if all(isinstance(m, str) for m in self.modes) else []
        registered = list(FIELDS["model.mode.type"].choices()) + list(biotorch.MODE_ALIASES)
        for m in self.mode_options:
            if m not in registered:
                problems.append(f"{p}.mode_options.{m}: {m!r} is not a registered mode; valid modes are "
                                f"{', '.join(sorted(registered))}{did_you_mean(m, registered)}")
            elif m not in modes:
                problems.append(f"{p}.mode_options.{m}: {m!r} is not a mode of this sweep "
                                f"({', '.join(modes)}){did_you_mean(m, modes)}")
            elif not isinstance(self.mode_options[m], Mapping):
                problems.append(f"{p}.mode_options.{m}: must be a mapping of options, got {self.mode_options[m]!r}")
        fields = {f.name for f in dataclasses.fields(ConvertConfig)} - {"mode", "options", "output_dim"}
        for k in self.convert:
            if k not in fields:
                problems.append(f"{p}.convert.{k}: unknown key{did_you_mean(k, sorted(fields))}; valid keys are "
                                f"{', '.join(sorted(fields))}")
        problems += _scale_problems(self.convert, f"{p}.convert.scale")
        return problems

    def _where(self, mode: str, key: str) -> str:
        """The YAML path of the option ``key`` of ``mode``: its ``mode_options`` when given there."""
        return f"{self._PATH}.mode_options.{mode}" if key in (self.mode_options.get(mode) or {}) \
            else f"{self._PATH}.options"

    def _mode_problems(self, m: str) -> List[str]:
        """The problems of mode ``m``'s options and of its ConvertConfig, each at its YAML path."""
        if m == BLOCKWISE:
            try:
                self.convert_config(m, seed=0)
            except ConfigError as e:
                return [f"{self._where(m, _problem_path(msg))}.{msg} (mode {m}; options of bio_ext.blockwise)"
                        for msg in e.problems]
            return []
        problems = []
        for msg in get_mode(m).rule.validate_options(self.mode_options_for(m)):
            key, text = _option_problem(msg)
            problems.append(f"{self._where(m, key)}.{text} (mode {m})")
        try:
            self.convert_config(m, seed=0)
        except ConfigError as e:
            problems += [f"{self._PATH}.convert.{msg}" for msg in e.problems if not _about_the_mode(msg)]
        return problems


def _scale_problems(convert: Mapping[str, Any], path: str) -> List[str]:
    """A positive ``scale`` that is not finite, or above :data:`MAX_SCALE`, or NaN. ``convert``
    accepts it and then fails drawing the feedback, after the run's folder exists; a scale <= 0 or
    not a number is left to ``ConvertConfig``'s own message."""
    if "scale" not in convert:
        return []
    scale = convert["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        return []
    try:
        value = float(scale)
    except OverflowError:  # an int beyond float's range
        value = math.inf
    if math.isfinite(value) and value <= MAX_SCALE:
        return []
    return [f"{path}: must be a finite positive number at most {MAX_SCALE:g} (the feedback is drawn in float32), "
            f"got {scale!r}"]


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

    # -------------------------------------------------------------- round trips
    def to_dict(self) -> Dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in _SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "BenchmarkConfig":
        return cls.from_dict(yaml_load(text) or {})

    @classmethod
    def from_dict(cls, data: Any) -> "BenchmarkConfig":
        """Validate the whole document; raise one ConfigError listing every problem."""
        if not isinstance(data, Mapping):
            raise ConfigError([f"<document>: must be a mapping of sections ({', '.join(_SECTIONS)}), "
                               f"got {type(data).__name__}"], what="benchmark configuration")
        data = copy.deepcopy(dict(data))
        problems: List[str] = []
        biotorch.apply_sugar(data)
        for key in data:
            if key not in _SECTIONS:
                problems.append(f"{key}: unknown section{did_you_mean(key, list(_SECTIONS))}; valid sections are "
                                f"{', '.join(_SECTIONS)}")
        built = {}
        for name, typ in _SECTIONS.items():
            section = _build(typ, data.get(name, {}), name, problems)
            if section is not None:
                built[name] = section
        if problems:
            raise ConfigError(problems, what="benchmark configuration")
        return cls(**built)


def _build(typ: type, values: Any, path: str, problems: List[str]):
    """Check one (sub)section's keys and values, recursing into nested sections; build it when clean."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        problems.append(f"{path}: must be a mapping of keys ({', '.join(f.name for f in dataclasses.fields(typ))}), "
                        f"got {values!r}")
        return None
    values = dict(values)
    biotorch.rename_keys(path, values, problems)
    names = [f.name for f in dataclasses.fields(typ)]
    before = len(problems)
    for key in values:
        if key not in names:
            problems.append(f"{path}.{key}: unknown key{did_you_mean(key, names)}; valid keys are {', '.join(names)}")
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


def load_config(path: str, overrides: Sequence[str] = ()) -> BenchmarkConfig:
    """Read, override and validate a benchmark YAML file."""
    return BenchmarkConfig.from_dict(apply_overrides(read_yaml(path), overrides))

