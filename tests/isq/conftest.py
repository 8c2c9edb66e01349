import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # helpers of these tests (llama_types, fake_source) by name

import gguf
import pytest


@pytest.fixture(scope="session")
def float_gemma(gemma_path, tmp_path_factory) -> str:
    """The shipped Gemma-3-270M dequantized by gguf-py into an F32 GGUF (general.file_type 0): the
    float model llama-quantize and jaxquant quantize from. Built once per session (~1 min)."""
    reader = gguf.GGUFReader(gemma_path)
    path = str(tmp_path_factory.mktemp("isq") / "gemma-f32.gguf")
    w = gguf.GGUFWriter(path, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), field.types[0])
    w.add_file_type(0)
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        w.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
