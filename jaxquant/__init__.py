"""jaxquant: quantized LLMs as pure JAX functions, with llama.cpp-exact formats."""

from jaxquant.errors import FileFormatError, FormatError, JaxquantError, PolicyError, QuantizeInputError
from jaxquant.formats import get_format, list_formats, quantize
from jaxquant.generate import Sampling, generate, generate_tokens
from jaxquant.isq import Policy, Rule
from jaxquant.model import Model, load
from jaxquant.qtensor import QTensor, dequantize

__all__ = ["load", "Model", "generate", "generate_tokens", "Sampling", "Policy", "Rule",
           "QTensor", "quantize", "dequantize", "get_format", "list_formats",
           "JaxquantError", "FormatError", "QuantizeInputError", "FileFormatError", "PolicyError"]
__version__ = "0.1.0"
