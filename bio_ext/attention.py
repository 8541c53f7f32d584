"""Old import path of :class:`~bio_ext.layers.attention.ExplicitMultiheadAttention`."""

from .layers.attention import ExplicitMultiheadAttention  # noqa: F401

__all__ = ["ExplicitMultiheadAttention"]
