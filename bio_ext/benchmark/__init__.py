"""YAML-driven benchmark runs: ``python -m bio_ext.benchmark CONFIG.yaml``.

``data`` (datasets), ``models`` (models by name), ``schema`` (the configuration and its
defaults), ``runner`` (training, checkpoints, results), ``tracking`` (TensorBoard),
``plots`` (PNG figures).
"""

from .runner import ExperimentResult, Run, RunResult, run_experiment  # noqa: F401
from .schema import BenchmarkConfig, apply_overrides, defaults_markdown, load_config  # noqa: F401

__all__ = ["BenchmarkConfig", "load_config", "apply_overrides", "defaults_markdown", "run_experiment", "Run",
           "RunResult", "ExperimentResult"]
