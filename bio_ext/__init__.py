"""bio_ext: backprop-free training (FA, DFA and relatives) as a one-line change.

    import bio_ext
    model = bio_ext.convert(model, mode="dfa")
    # the training loop stays as it was
"""

from . import errors
from . import layers as _layers  # noqa: F401  (registers the layer types and the attention expander)
from . import modes as _modes  # noqa: F401  (registers the built-in modes)
from . import blockwise  # noqa: F401  (callable: bio_ext.blockwise(model, ...); registers 'bwbpf')
from .blockwise import BlockwiseConfig, local_losses, partition, set_targets, train_step
from .config import ConvertConfig
from .convert import convert, feedback_layers, is_converted, revert, state_of
from .errors import (AlreadyConvertedError, BioExtError, ConfigError, ConversionError, FeedbackSignalError,
                     NothingToConvertError, OutputDimError, OutputTypeError, PartitionError, Problem,
                     UnknownModeError, UnsupportedModuleError)
from .inspection import LayerAlignment, alignment, input_gradients
from .layers import FeedbackConv2d, FeedbackLayer, FeedbackLinear
from .modes import FeedbackRule, register_mode
from .points import feedback_points
from .registry import available_modes, get_mode, register_expander, register_layer

__version__ = "0.1.0"

__all__ = [
    "convert", "revert", "alignment", "LayerAlignment", "input_gradients", "is_converted", "feedback_layers",
    "state_of", "register_layer", "register_mode", "available_modes", "get_mode", "FeedbackRule", "ConvertConfig",
    "FeedbackLayer", "FeedbackLinear", "FeedbackConv2d", "errors", "BioExtError", "ConfigError", "UnknownModeError",
    "ConversionError", "AlreadyConvertedError", "NothingToConvertError", "OutputDimError", "UnsupportedModuleError",
    "OutputTypeError", "FeedbackSignalError", "Problem", "feedback_points", "register_expander", "blockwise",
    "BlockwiseConfig", "partition", "set_targets", "train_step", "local_losses", "PartitionError",
]
