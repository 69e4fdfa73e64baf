"""jaxpar: tensor, pipeline, data and FSDP parallelism for Flax NNX transformers."""

from jaxpar.errors import JaxparError

__version__ = "0.1.0"
__all__ = ["JaxparError", "__version__"]
