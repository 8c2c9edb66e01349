"""jaxquant: quantized LLMs as pure JAX functions, with llama.cpp-exact formats."""

from jaxquant.errors import FileFormatError, FormatError, JaxquantError, QuantizeInputError
from jaxquant.formats import get_format, list_formats, quantize
from jaxquant.generate import Sampling, generate, generate_tokens
from jaxquant.model import Model, load
from jaxquant.qtensor import QTensor, dequantize

__all__ = ["load", "Model", "generate", "generate_tokens", "Sampling",
           "QTensor", "quantize", "dequantize", "get_format", "list_formats",
           "JaxquantError", "FormatError", "QuantizeInputError", "FileFormatError"]
__version__ = "0.1.0"
