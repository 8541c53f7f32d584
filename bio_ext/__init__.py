"""bio_ext: backprop-free training (FA, DFA and relatives) as a one-line change.

    import bio_ext
    model = bio_ext.convert(model, mode="dfa")
    # the training loop stays as it was
"""

from . import errors
from . import grape  # noqa: F401  (registers the 'grape' mode)
from .blockwise import BlockwiseConfig, blockwise, local_losses, partition, set_targets, train_step
from .config import ConvertConfig
from .convert import convert, feedback_layers, is_converted, register_expander, register_layer, revert
from .errors import (AlreadyConvertedError, BioExtError, ConfigError, ConversionError, FeedbackSignalError,
                     NothingToConvertError, OutputDimError, OutputTypeError, PartitionError, UnknownModeError,
                     UnsupportedModuleError)
from .inspection import LayerAlignment, alignment, input_gradients
from .layers import FeedbackConv2d, FeedbackLayer, FeedbackLinear
from .modes import FeedbackRule, available_modes, get_mode, register_mode
from .points import feedback_points

__version__ = "0.1.0"

__all__ = [
    "convert", "revert", "alignment", "LayerAlignment", "input_gradients", "is_converted", "feedback_layers", "register_layer", "register_mode",
    "available_modes", "get_mode", "FeedbackRule", "ConvertConfig", "FeedbackLayer", "FeedbackLinear",
    "FeedbackConv2d", "errors", "BioExtError", "ConfigError", "UnknownModeError", "ConversionError",
    "AlreadyConvertedError", "NothingToConvertError", "OutputDimError", "UnsupportedModuleError",
    "OutputTypeError", "FeedbackSignalError", "feedback_points", "register_expander", "LayerAlignment",
    "blockwise", "BlockwiseConfig", "partition", "set_targets", "train_step", "local_losses", "PartitionError",
]
