"""Quantization formats: a registry of block layouts with exact quantize/dequantize."""

from jaxquant.formats import ggml_legacy, plain  # noqa: F401  (registers the formats)
from jaxquant.formats.registry import Field, Format, PlainFormat, get_format, list_formats, quantize, register

__all__ = ["Field", "Format", "PlainFormat", "get_format", "list_formats", "quantize", "register"]
