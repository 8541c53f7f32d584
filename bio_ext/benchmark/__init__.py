"""YAML-driven benchmark runs: ``python -m bio_ext.benchmark CONFIG.yaml``.

``schema`` (the configuration's sections), ``fields`` (every key: default, allowed values,
meaning), ``biotorch`` (every biotorch compatibility rule), ``data`` (datasets), ``models``
(models by name), ``build`` (a run's device, data, converted model, optimizer, scheduler),
``runner`` (the training loop, checkpoints, the sweep), ``results`` (result files and the
summary), ``tracking`` (TensorBoard), ``plots`` (PNG figures), ``yamlio`` (reading files and
overrides), ``errors`` (the runner's typed errors, each a :class:`bio_ext.errors.BioExtError`).
"""

from .results import RunResult  # noqa: F401
from .runner import ExperimentResult, Run, run_experiment  # noqa: F401
from .schema import BenchmarkConfig, apply_overrides, defaults_markdown, load_config  # noqa: F401

__all__ = ["BenchmarkConfig", "load_config", "apply_overrides", "defaults_markdown", "run_experiment", "Run",
           "RunResult", "ExperimentResult"]
