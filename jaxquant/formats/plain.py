"""Unquantized GGUF types: F32, F16, BF16. Leaves stay plain arrays."""

from jaxquant.formats.registry import PlainFormat, register

F32 = register(PlainFormat("F32", "float32"))
F16 = register(PlainFormat("F16", "float16"))
BF16 = register(PlainFormat("BF16", "bfloat16"))
