"""lsjax: LightSeq's fused Transformer kernels and training ideas, native to JAX."""

from lsjax import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
