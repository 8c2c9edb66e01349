"""Quantization formats: a registry of block layouts with exact quantize/dequantize."""

# Importing a family module registers its formats.
from jaxquant.formats import ggml_iq, ggml_iq_lattice, ggml_k, ggml_k_sym, ggml_legacy, ggml_ternary, mx, plain  # noqa: F401
from jaxquant.formats import bnb, fp8, hqq, mlx_affine, nvfp4  # noqa: F401
from jaxquant.formats import gptq  # noqa: F401
from jaxquant.formats.registry import Field, Format, PlainFormat, get_format, list_formats, quantize, register

__all__ = ["Field", "Format", "PlainFormat", "get_format", "list_formats", "quantize", "register"]
