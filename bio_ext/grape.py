"""Old import path of GrAPE: the rule and its definitions live in :mod:`bio_ext.modes.grape`."""

from .modes.grape import DEFAULTS, GradientAlignedProjectedError, batch_cosine, validate_options  # noqa: F401

__all__ = ["DEFAULTS", "GradientAlignedProjectedError", "batch_cosine", "validate_options"]
