"""Small valid GGUF files written by gguf-py's own writer (the outside reference for our reader)."""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

VOCAB = [f"tok{i}" for i in range(29)] + ["<s>", "</s>", "\u00e9\u00e8\U0001f600"]

# key -> (value, GGUF type, array element type)
METADATA = {
    "general.architecture": ("llama", V.STRING, None),
    "general.name": ("tiny", V.STRING, None),
    "llama.context_length": (128, V.UINT32, None),
    "llama.embedding_length": (64, V.UINT32, None),
    "llama.block_count": (1, V.UINT32, None),
    "llama.feed_forward_length": (128, V.UINT32, None),
    "llama.attention.head_count": (4, V.UINT32, None),
    "llama.attention.head_count_kv": (2, V.UINT32, None),
    "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32, None),
    "llama.rope.freq_base": (500000.0, V.FLOAT32, None),
    "tokenizer.ggml.model": ("llama", V.STRING, None),
    "tokenizer.ggml.tokens": (VOCAB, V.ARRAY, V.STRING),
    "tokenizer.ggml.scores": ([-float(i) for i in range(32)], V.ARRAY, V.FLOAT32),
    "tokenizer.ggml.token_type": ([1] * 29 + [3, 3, 1], V.ARRAY, V.INT32),
    "tokenizer.ggml.bos_token_id": (29, V.UINT32, None),
    "tokenizer.ggml.eos_token_id": (30, V.UINT32, None),
    "tokenizer.ggml.add_bos_token": (True, V.BOOL, None),
    "test.int8": (-5, V.INT8, None),
    "test.uint16": (65535, V.UINT16, None),
    "test.int64": (-2**40, V.INT64, None),
    "test.uint64": (2**63 + 7, V.UINT64, None),
    "test.float64": (0.1, V.FLOAT64, None),
    "test.bytes": ([0, 255, 7], V.ARRAY, V.UINT8),
}


def sample_tensors(seed: int = 0) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (GGML type, logical shape, data bytes), quantized by gguf-py."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, type_, shape in (("token_embd.weight", T.Q8_0, (32, 64)), ("output_norm.weight", T.F32, (64,)),
                               ("blk.0.attn_q.weight", T.Q4_0, (64, 64)), ("blk.0.attn_k.weight", T.F16, (32, 64))):
        x = rng.standard_normal(shape).astype(np.float32)
        if type_ == T.F32:
            data = x.view(np.uint8).reshape(-1)
        elif type_ == T.F16:
            data = x.astype(np.float16).view(np.uint8).reshape(-1)
        else:
            data = gguf.quants.quantize(x, type_).reshape(-1)
        out[name] = (type_.name, shape, data)
    return out


def write_sample(path, tensors=None, alignment: int | None = None, metadata=None) -> None:
    """The sample model through ``gguf.GGUFWriter``; ``metadata``: keys of ``METADATA`` replaced."""
    tensors = sample_tensors() if tensors is None else tensors
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype, sub) in {**METADATA, **(metadata or {})}.items():
        if key != "general.architecture":
            w.add_key_value(key, value, vtype, sub_type=sub)
    if alignment:
        w.add_custom_alignment(alignment)
    for name, (type_name, shape, data) in tensors.items():
        qtype = T[type_name]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor(name, data.reshape(*shape[:-1], shape[-1] // block * size), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tensor_info_offset(blob: bytes, name: str) -> int:
    """File offset of a tensor's info record (its name's length field)."""
    pos = blob.index(len(name).to_bytes(8, "little") + name.encode())
    return pos


# A complete one-layer llama (every tensor the architecture needs, tied embeddings) whose tensors
# take seven GGUF types: what `jaxquant.load` loads end to end, small enough to load in milliseconds.
TINY_LLAMA_TENSORS = (("token_embd.weight", T.Q8_0, (32, 64)), ("output_norm.weight", T.F32, (64,)),
                      ("blk.0.attn_norm.weight", T.F32, (64,)), ("blk.0.attn_q.weight", T.Q4_0, (64, 64)),
                      ("blk.0.attn_k.weight", T.F16, (32, 64)), ("blk.0.attn_v.weight", T.Q5_1, (32, 64)),
                      ("blk.0.attn_output.weight", T.BF16, (64, 64)), ("blk.0.ffn_norm.weight", T.F32, (64,)),
                      ("blk.0.ffn_gate.weight", T.Q4_1, (256, 64)), ("blk.0.ffn_up.weight", T.Q5_0, (256, 64)),
                      ("blk.0.ffn_down.weight", T.TQ2_0, (64, 256)))


def write_tiny_llama(path, alignment: int | None = None, seed: int = 0) -> None:
    """The complete tiny llama through ``gguf.GGUFWriter`` (data quantized by gguf-py)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, type_, shape in TINY_LLAMA_TENSORS:
        x = (rng.standard_normal(shape) * (1.0 if len(shape) == 1 else 0.05)).astype(np.float32)
        data = x if type_ == T.F32 else x.astype(np.float16) if type_ == T.F16 else gguf.quants.quantize(x, type_)
        tensors[name] = (type_.name, shape, np.ascontiguousarray(data).view(np.uint8).reshape(-1))
    write_sample(path, tensors, alignment, {"llama.feed_forward_length": (256, V.UINT32, None)})
