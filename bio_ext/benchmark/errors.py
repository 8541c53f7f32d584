"""The exceptions the benchmark runner adds to :mod:`bio_ext.errors`.

Each derives from :class:`~bio_ext.errors.BioExtError` (the CLI reports any of them as one line
and exits with status 2) and from the built-in a caller would already catch: ``ValueError`` for a
bad file's content, ``OSError`` for a folder that cannot be written. Each message is one line that
names the file and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from ..errors import BioExtError, ConfigError, DataNotFoundError, NonFiniteLossError

__all__ = ["ConfigFileError", "DataFileError", "OutputDirError", "RunFileError", "TrainingDivergedError",
           "SweepInterrupted"]


class ConfigFileError(ConfigError):
    """The configuration file cannot be read as YAML text (absent, binary, unreadable). A
    :class:`~bio_ext.errors.ConfigError` whose message is the one line of its one problem."""

    def __init__(self, path: Union[str, Path], message: str):
        self.path = str(path)
        self.problems = [f"{path}: {message}"]
        ValueError.__init__(self, self.problems[0])


class DataFileError(DataNotFoundError):
    """A dataset file is there but damaged (truncated, not the expected format). A
    :class:`~bio_ext.errors.DataNotFoundError`, so code that catches a missing file catches it too."""

    def __init__(self, path: Union[str, Path], message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class OutputDirError(BioExtError, OSError):
    """A folder or file of the outputs cannot be written (a file in the way, no permission, disk full)."""

    def __init__(self, path: Union[str, Path], message: str):
        self.path = str(path)
        OSError.__init__(self, f"{path}: {message}")

    def __str__(self) -> str:
        return str(self.args[0])


class RunFileError(BioExtError, ValueError):
    """A run's ``checkpoint.pt`` or ``results.json`` cannot be read on resume (truncated, garbage).
    The run is marked failed and the sweep goes on; the message says which file to delete."""

    def __init__(self, path: Union[str, Path], message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class TrainingDivergedError(NonFiniteLossError):
    """Training diverged although the loss was finite: a parameter or floating buffer is NaN or
    infinite, or the loss grew past the runner's bound (see :mod:`bio_ext.benchmark.runner`). A
    :class:`~bio_ext.errors.NonFiniteLossError`, so the sweep records the run as diverged the
    same way."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C (``KeyboardInterrupt``) during :func:`~bio_ext.benchmark.runner.run_experiment`, raised
    after ``summary.md`` was written for the runs that ended. ``result`` is that partial
    :class:`~bio_ext.benchmark.runner.ExperimentResult`; ``pending`` names the runs that did not
    end (``mode/seed_k``). Not a BioExtError: an interrupt is not the user's input being wrong."""

    def __init__(self, message: str, result: Optional[object] = None, pending: Optional[list] = None):
        super().__init__(message)
        self.result = result
        self.pending = list(pending or [])
