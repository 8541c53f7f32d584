"""Every key of a benchmark configuration: its default, type, allowed values and meaning.

Each key is one row of :data:`FIELDS`, the only place defaults are defined (:data:`DEFAULTS`
reads them from there); :func:`check_value` checks and normalises one value against its row, and
:func:`defaults_markdown` renders the table for the README. The sections of
:mod:`bio_ext.benchmark.schema` are built from these rows.

Numbers written like ``1e-4`` (which YAML 1.1 reads as a string) are accepted where a number is
expected.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from ..modes import available_modes
from .biotorch import ARCH_ALIASES, DATASET_ALIASES, MODE_ALIASES
from .data import available_datasets
from .models import available_models

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
    return sorted({*available_modes(), BLOCKWISE})


def _datasets() -> List[str]:
    return available_datasets()


def _models() -> List[str]:
    return available_models()


OPTIMIZERS = ("sgd", "adam", "rmsprop")
SCHEDULERS = ("none", "multistep_lr", "cosine", "exponential")
#: the feedback is drawn from the run's seed plus this offset. The model's weights are drawn from the
#: run's seed itself; with the same seed a layer's feedback would repeat its own initial weights.
FEEDBACK_SEED_OFFSET = 1_000_003

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
    "data.test_limit": Spec(None, "int?", "keep the first test_limit test examples (CPU proxies); null: all",
                            lambda v: v >= 1, ">= 1"),
    "data.augment": Spec(False, "bool", "training augmentation where the dataset has one (cifar10: "
                         "random crop and flip)"),
    "data.options": Spec({}, "mapping", "extra options of the dataset loader (e.g. synthetic's `num_classes`)"),
    "model.architecture": Spec("mlp", "str", "model name: mlp, cnn, le_net, resnet20/56, any torchvision "
                               "classification model (`le_net_mnist`/`le_net_cifar`: biotorch's LeNets)",
                               choices=_models, aliases=ARCH_ALIASES),
    "model.kwargs": Spec({}, "mapping", "keyword arguments of the model builder (mlp: `hidden`, `activation`)"),
    "model.pretrained": Spec(False, "bool", "torchvision architectures: start from torchvision's default "
                             "weights (torch.hub's cache, downloaded there when online); the layers whose shape "
                             "differs, such as the classifier for another number of classes, start fresh"),
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
                                "(one process uses the first; under torchrun local rank r uses the r-th), else the "
                                "CPU with a warning",
                                lambda v: (v >= -1) if isinstance(v, int) else (len(v) > 0 and all(g >= 0 for g in v)),
                                "-1, a device index >= 0 or a non-empty list of them"),
    "infrastructure.threads": Spec(None, "int?", "torch.set_num_threads; null: leave torch's default",
                                   lambda v: v >= 1, ">= 1"),
    "evaluation.enabled": Spec(True, "bool", "evaluate on the test set after every epoch (biotorch's `evaluation: true` "
                               "or `false` is shorthand for it)"),
}

DEFAULTS: Dict[str, Any] = {path: spec.default for path, spec in FIELDS.items()}


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


def did_you_mean(word: str, options: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` naming the closest of ``options``, or ``""`` when none is close."""
    near = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _check_kind(v: Any, kind: str, got: str) -> Tuple[Any, Optional[str]]:
    """``(normalised value, None)`` when ``v`` is of ``kind`` (no ``|`` or ``?``), else ``(v, problem)``."""
    if kind == "str":
        return (v, None) if isinstance(v, str) else (v, f"must be a string, {got}")
    if kind == "bool":
        return (v, None) if isinstance(v, bool) else (v, f"must be true or false, {got}")
    if kind == "int":
        return (v, None) if _is_int(v) else (v, f"must be an integer, {got}")
    if kind == "number":
        n = _as_number(v)
        if n is None or not math.isfinite(n):
            return v, f"must be a finite number, {got}"
        return n, None
    if kind == "mapping":
        if not isinstance(v, Mapping) or not all(isinstance(key, str) for key in v):
            return v, f"must be a mapping with string keys, {got}"
        return dict(v), None
    if kind.startswith("list["):
        if not isinstance(v, (list, tuple)):
            return v, f"must be a list of {kind[5:-1]}s, {got}"
        out = []
        for item in v:
            x, err = _check_kind(item, kind[5:-1], got)
            if err:
                return v, f"must be a list of {kind[5:-1]}s, {got}"
            out.append(x)
        return out, None
    raise AssertionError(kind)


def _check_choices(path: str, spec: Spec, value: Any) -> Tuple[Any, List[str]]:
    """Resolve aliases and case, and check the name (or each name of a list) is one of ``spec``'s choices."""
    valid = list(spec.choices())
    items = value if isinstance(value, list) else [value]
    problems, fixed = [], []
    for item in items:
        key = item.lower() if spec.lower else item
        key = spec.aliases.get(key, key)
        if key not in valid:
            extra = sorted(set(valid) | set(spec.aliases))
            problems.append(f"{path}: {item!r} is not one of {', '.join(extra)}{did_you_mean(key, extra)}")
        fixed.append(key)
    if not isinstance(value, list):
        return fixed[0], problems
    if not fixed:
        problems.append(f"{path}: must not be empty")
    elif len(set(fixed)) != len(fixed):
        problems.append(f"{path}: lists {', '.join(sorted({f for f in fixed if fixed.count(f) > 1}))} twice")
    return fixed, problems


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
    if "|" in kind:
        scalar, listed = kind.split("|")
        value, err = _check_kind(value, listed if isinstance(value, (list, tuple)) else scalar, got)
        if err:
            err = f"must be a {scalar} or a list of them, {got}"
    else:
        value, err = _check_kind(value, kind, got)
    if err:
        return value, [f"{path}: {err}"]
    problems = []
    if spec.choices is not None:
        value, problems = _check_choices(path, spec, value)
    if spec.check is not None and not problems and not spec.check(value):
        problems.append(f"{path}: must be {spec.expect}, {got}")
    return value, problems


# ------------------------------------------------------------------------------------------ the README


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
