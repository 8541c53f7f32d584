"""Feedback-aware layers, one module per layer type, each registering itself: Linear and
transformers' Conv1D (:mod:`~bio_ext.layers.linear`), Conv2d (:mod:`~bio_ext.layers.conv2d`),
and the expanded ``nn.MultiheadAttention`` (:mod:`~bio_ext.layers.attention`)."""

from .attention import ExplicitMultiheadAttention
from .base import FeedbackLayer
from .conv2d import Conv2dDirectFn, Conv2dLocalFn, FeedbackConv2d
from .linear import FeedbackLinear, LinearDirectFn, LinearLocalFn, linear

__all__ = ["Conv2dDirectFn", "Conv2dLocalFn", "ExplicitMultiheadAttention", "FeedbackConv2d", "FeedbackLayer",
           "FeedbackLinear", "LinearDirectFn", "LinearLocalFn", "linear"]
