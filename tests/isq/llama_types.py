"""llama.cpp's own choice of tensor types for a mix, without quantizing anything: the helpers
llama-quant.cpp exports for its tests (llama_quant_model_from_metadata, llama_quant_init,
llama_quant_compute_types), driven through ctypes on a mock model of any shape."""

from __future__ import annotations

import ctypes
import functools
import pathlib

import gguf


class _Desc(ctypes.Structure):
    _fields_ = [("architecture", ctypes.c_char_p)] + [
        (k, ctypes.c_uint32) for k in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert",
                                       "n_embd_head_k", "n_embd_head_v")]


class _GgmlInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@functools.cache
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    import llama_cpp

    llama_cpp.llama_backend_init()
    libdir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(next(libdir.glob("libggml-base.so*"))))
    base.ggml_init.restype = ctypes.c_void_p
    base.ggml_init.argtypes = [_GgmlInitParams]
    base.ggml_new_tensor.restype = ctypes.c_void_p
    base.ggml_new_tensor.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    base.ggml_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_free.argtypes = [ctypes.c_void_p]
    lib = ctypes.CDLL(str(next(libdir.glob("libllama.so*"))))
    fns = {"from_metadata": "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc",
           "init": "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params",
           "free": "_Z16llama_quant_freeP19quantize_state_impl",
           "compute": "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem"}
    f = {k: getattr(lib, v) for k, v in fns.items()}
    f["from_metadata"].restype = ctypes.c_void_p
    f["from_metadata"].argtypes = [ctypes.POINTER(_Desc)]
    f["init"].restype = ctypes.c_void_p
    f["init"].argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    f["free"].argtypes = [ctypes.c_void_p]
    f["compute"].argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                             ctypes.POINTER(ctypes.c_int), ctypes.c_size_t]
    lib.fns = f
    return base, lib


def compute_types(arch: str, n_layer: int, n_head: int, n_head_kv: int, n_expert: int,
                  tensors: list[tuple[str, tuple[int, ...]]], ftype: int, *, pure: bool = False,
                  output_type: str | None = None, embedding_type: str | None = None,
                  overrides: list[tuple[str, str]] = ()) -> dict[str, str]:
    """llama.cpp's type per tensor (name, numpy-order shape), in the order given (its counters
    advance in that order: pass llama.cpp's). ``overrides``: --tensor-type (regex, type) pairs."""
    import llama_cpp

    base, lib = _libs()
    desc = _Desc(arch.encode(), 64, 64, n_layer, n_head, n_head_kv, n_expert, 64, 64)
    model = lib.fns["from_metadata"](ctypes.byref(desc))
    params = llama_cpp.llama_model_quantize_default_params()
    params.pure = pure
    if output_type:
        params.output_tensor_type = int(gguf.GGMLQuantizationType[output_type])
    if embedding_type:
        params.token_embedding_type = int(gguf.GGMLQuantizationType[embedding_type])
    keep = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (pattern, type_name) in enumerate(overrides):
        keep[i].pattern = pattern.encode()
        keep[i].type = int(gguf.GGMLQuantizationType[type_name])
    if overrides:
        params.tt_overrides = keep
    qs = lib.fns["init"](model, ctypes.byref(params))
    ctx = base.ggml_init(_GgmlInitParams((1 << 16) + 512 * len(tensors), None, True))
    try:
        ptrs = (ctypes.c_void_p * len(tensors))()
        for i, (name, shape) in enumerate(tensors):
            ne = (ctypes.c_int64 * len(shape))(*reversed(shape))
            ptrs[i] = base.ggml_new_tensor(ctx, 0, len(shape), ne)
            base.ggml_set_name(ptrs[i], name.encode())
        out = (ctypes.c_int * len(tensors))()
        lib.fns["compute"](qs, ftype, ptrs, out, len(tensors))
        return {name: gguf.GGMLQuantizationType(out[i]).name for i, (name, _) in enumerate(tensors)}
    finally:
        base.ggml_free(ctx)
        lib.fns["free"](qs)
        llama_cpp.llama_model_free(model)
