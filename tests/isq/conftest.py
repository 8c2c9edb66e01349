import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # helpers of these tests (llama_types, fake_source, ...) by name

import pytest

from float_model import dequantized_gguf


@pytest.fixture(scope="session")
def float_gemma(gemma_path, tmp_path_factory) -> str:
    """The shipped Gemma-3-270M dequantized into an F32 GGUF: the float model llama-quantize and
    jaxquant quantize from. Built once per session (~1 min)."""
    return dequantized_gguf(gemma_path, str(tmp_path_factory.mktemp("isq") / "gemma-f32.gguf"))
