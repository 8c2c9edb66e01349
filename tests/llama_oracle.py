"""llama.cpp as the oracle: its own quantizers (ggml_quantize_chunk in libggml-base) via ctypes.

llama-cpp-python (the `oracle` extra) ships llama.cpp's shared libraries; ggml-quants.c is
compiled there without -march flags, so its arithmetic is plain IEEE float without FMA.
"""

from __future__ import annotations

import ctypes
import functools
import pathlib

import gguf
import numpy as np


@functools.cache
def libggml() -> ctypes.CDLL:
    import llama_cpp  # noqa: F401  (raises if the oracle extra is not installed)

    libdir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(next(libdir.glob("libggml-base.so*"))))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def quantize(x: np.ndarray, type_name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's bytes for ``x`` [rows, K] (float32) as uint8 [rows, row_bytes]."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
    n = libggml().ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                                      None if imat is None else imat.ctypes.data)
    assert n == out.nbytes, (n, out.nbytes)
    return out


def block_mismatch(a: np.ndarray, b: np.ndarray, type_size: int) -> tuple[int, int]:
    """(differing blocks, total blocks) between two byte arrays of one tensor."""
    a, b = a.reshape(-1, type_size), b.reshape(-1, type_size)
    return int((a != b).any(axis=1).sum()), a.shape[0]


def model_quantize(src: str, dst: str, ftype: int, pure: bool = False,
                   imatrix: dict[str, np.ndarray] | None = None) -> None:
    """llama_model_quantize (2 threads, as llama-quantize) of the GGUF ``src`` into ``dst``; ``imatrix``:
    tensor name -> importance weights (what llama-quantize reads from an imatrix file)."""
    import llama_cpp
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(False)  # no per-tensor log
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = ftype, pure, 2
    keep = []
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # a zeroed entry ends the list
        for i, (name, w) in enumerate(sorted(imatrix.items())):
            keep.append(np.ascontiguousarray(w, np.float32))
            entries[i].name, entries[i].size = name.encode(), keep[-1].size
            entries[i].data = keep[-1].ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = entries
    assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) == 0
