"""Training modes as registered rules (see :mod:`bio_ext.modes.base`): ``bp`` and the Feedback
Alignment family in :mod:`~bio_ext.modes.local`, ``dfa``/``drtp`` in :mod:`~bio_ext.modes.direct`,
GrAPE with its forward-mode machinery in :mod:`~bio_ext.modes.grape`, and the peers GrAPE is compared with:
PEPITA (:mod:`~bio_ext.modes.pepita`), DKP (:mod:`~bio_ext.modes.dkp`) and FDFA (:mod:`~bio_ext.modes.fdfa`,
on GrAPE's tangents). Importing this package registers them all."""

from ..registry import FAMILIES, ModeSpec, available_modes, get_mode
from . import direct, grape, local  # noqa: F401  (register the built-in modes)
from . import dkp, fdfa, pepita  # noqa: F401  (after grape: fdfa builds on it)
from .base import (INIT_SCHEMES, FeedbackRule, FeedbackSpec, feedback_generator, init_bound, random_feedback,
                   register_mode)

__all__ = ["FAMILIES", "INIT_SCHEMES", "FeedbackRule", "FeedbackSpec", "ModeSpec", "available_modes",
           "feedback_generator", "get_mode", "init_bound", "random_feedback", "register_mode"]
