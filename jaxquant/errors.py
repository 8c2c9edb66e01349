"""One exception hierarchy: every error jaxquant raises on purpose is a JaxquantError."""


class JaxquantError(Exception):
    """Base class; messages say what was wrong, where, and what to do."""


class FormatError(JaxquantError, ValueError):
    """Unknown format, or a tensor whose shape or bytes do not fit its format."""


class QuantizeInputError(JaxquantError, ValueError):
    """Bad input to quantize: NaN/Inf, wrong dtype, row length not a multiple of the block, no elements,
    values out of the format's range (a non-finite result or a 100% error)."""


class FileFormatError(JaxquantError):
    """A model file that cannot be read: truncated, bad magic, unknown type, ..."""


class PolicyError(JaxquantError, ValueError):
    """A quantization policy that cannot apply: unknown format, rule key or regex, a format a
    tensor cannot take."""
