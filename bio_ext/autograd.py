"""Old import path of the autograd Functions, which now live beside their layers in
:mod:`bio_ext.layers.linear` and :mod:`bio_ext.layers.conv2d`."""

from .layers.conv2d import Conv2dDirectFn, Conv2dLocalFn  # noqa: F401
from .layers.linear import LinearDirectFn, LinearLocalFn, linear  # noqa: F401

__all__ = ["Conv2dDirectFn", "Conv2dLocalFn", "LinearDirectFn", "LinearLocalFn", "linear"]
