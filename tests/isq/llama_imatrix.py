"""llama-imatrix without its binary: llama.cpp (llama-cpp-python) runs the model over the chunks
with an eval callback that is IMatrixCollector::collect_imatrix (tools/imatrix/imatrix.cpp) in
Python, and the result is written by ggml's own GGUF writer the way IMatrixCollector::save_imatrix
writes it. The chunking, BOS and tokenization are compute_imatrix's."""

from __future__ import annotations

import ctypes
import pathlib

import numpy as np

GGML_MAX_DIMS, GGML_MAX_SRC = 4, 10
GGML_TYPE_F32 = 0


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor (ggml/include/ggml.h)."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32), ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)), ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _ggml() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(next((pathlib.Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))))
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_nrows.restype = ctypes.c_int64
    lib.ggml_nrows.argtypes = [ctypes.c_void_p]
    for name, res, args in [("gguf_init_empty", ctypes.c_void_p, []), ("gguf_free", None, [ctypes.c_void_p]),
                            ("gguf_set_val_str", None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]),
                            ("gguf_set_val_u32", None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]),
                            ("gguf_set_arr_str", None, [ctypes.c_void_p, ctypes.c_char_p,
                                                        ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t]),
                            ("gguf_add_tensor", None, [ctypes.c_void_p, ctypes.c_void_p]),
                            ("gguf_write_to_file", ctypes.c_bool, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_bool]),
                            ("ggml_new_tensor_2d", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                                                     ctypes.c_int64]),
                            ("ggml_set_name", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
                            ("ggml_free", None, [ctypes.c_void_p]), ("ggml_init", ctypes.c_void_p, [_InitParams])]:
        getattr(lib, name).restype, getattr(lib, name).argtypes = res, args
    return lib


def collect(model_path: str, text: str, n_ctx: int = 512, n_chunks: int = 10, f32: bool = False
            ) -> tuple[dict[str, np.ndarray], dict[str, int], int]:
    """(sums name -> float32 [K], counts name -> tokens, chunks) as llama-imatrix collects them on
    CPU with its default settings (f16 KV cache, flash attention on auto); ``f32``: an f32 KV cache
    and no flash attention, llama.cpp's most exact arithmetic."""
    import llama_cpp
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(False)
    ggml = _ggml()
    mul_mat = next(i for i in range(200) if ggml.ggml_op_name(i) == b"MUL_MAT")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def callback(t_ptr, ask, _user):
        t = ctypes.cast(t_ptr, ctypes.POINTER(GgmlTensor)).contents
        if t.op != mul_mat:
            return False if ask else True
        src0, src1 = t.src[0].contents, t.src[1].contents
        wname = src0.name.decode()
        if "#" in wname:  # CUDA0#blk.0.attn_k.weight#0 => blk.0.attn_k.weight
            wname = wname.split("#")[1]
        if ask:
            return bool(src1.ne[1] >= 16 and src1.type == GGML_TYPE_F32 and wname.startswith("blk."))
        n_mat = src0.ne[2] * src0.ne[3]
        assert n_mat == 1, "dense models only"
        ne0, ne1, ne2, ne3 = src1.ne
        nb1, nb2, nb3 = src1.nb[1], src1.nb[2], src1.nb[3]
        rows = np.lib.stride_tricks.as_strided(
            np.ctypeslib.as_array(ctypes.cast(src1.data, ctypes.POINTER(ctypes.c_float)),
                                  shape=(int((ne3 - 1) * nb3 + (ne2 - 1) * nb2 + (ne1 - 1) * nb1) // 4 + ne0,)),
            shape=(ne3, ne2, ne1, ne0), strides=(nb3, nb2, nb1, 4)).reshape(-1, ne0)
        acc = sums.get(wname, np.zeros(ne0, np.float32))
        # token by token in float32, as acc[j] += x[j] * x[j] (numpy's cumsum adds sequentially)
        sums[wname] = np.cumsum(np.concatenate([acc[None], rows * rows]), axis=0, dtype=np.float32)[-1]
        counts[wname] = counts.get(wname, 0) + int(ggml.ggml_nrows(ctypes.addressof(src1))) // n_mat
        return True

    cb = llama_cpp.ggml_backend_sched_eval_callback(callback)
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), mparams)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch, cparams.n_seq_max = n_ctx, n_ctx, n_ctx, 1
    cparams.n_threads = cparams.n_threads_batch = 2
    cparams.cb_eval, cparams.cb_eval_user_data = cb, None
    if f32:
        cparams.type_k = cparams.type_v = GGML_TYPE_F32
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    vocab = llama_cpp.llama_model_get_vocab(model)
    raw = text.encode()
    buf = (llama_cpp.llama_token * (len(raw) + 16))()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, False)
    tokens = list(buf[:n])
    assert len(tokens) >= 2 * n_ctx
    n_chunks = min(n_chunks, len(tokens) // n_ctx)
    batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
    try:
        for i in range(n_chunks):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
            if llama_cpp.llama_vocab_get_add_bos(vocab):
                chunk[0] = llama_cpp.llama_vocab_bos(vocab)
            batch.n_tokens = n_ctx
            for k, tok in enumerate(chunk):
                batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.logits[k] = tok, k, 1, True
                batch.seq_id[k][0] = 0
            assert llama_cpp.llama_decode(ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return sums, counts, n_chunks


def save(path: str, sums: dict[str, np.ndarray], counts: dict[str, int], n_chunks: int, chunk_size: int,
         datasets: list[str]) -> None:
    """IMatrixCollector::save_imatrix, through ggml's GGUF writer."""
    ggml = _ggml()
    names = sorted(sums)
    mem = sum(2 * (512 + 4 * sums[n].size + 64) for n in names) + 4096  # tensor overheads and data
    ctx = ggml.ggml_init(_InitParams(mem, None, False))
    g = ggml.gguf_init_empty()
    try:
        ggml.gguf_set_val_str(g, b"general.type", b"imatrix")
        arr = (ctypes.c_char_p * max(1, len(datasets)))(*[d.encode() for d in datasets])
        ggml.gguf_set_arr_str(g, b"imatrix.datasets", arr, len(datasets))
        ggml.gguf_set_val_u32(g, b"imatrix.chunk_count", n_chunks)
        ggml.gguf_set_val_u32(g, b"imatrix.chunk_size", chunk_size)
        for name in names:
            values = np.ascontiguousarray(sums[name], np.float32)
            in_sum2 = ggml.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, values.size, 1)
            cnt = ggml.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, 1)
            ggml.ggml_set_name(in_sum2, f"{name}.in_sum2".encode())
            ggml.ggml_set_name(cnt, f"{name}.counts".encode())
            ctypes.memmove(ctypes.cast(in_sum2, ctypes.POINTER(GgmlTensor)).contents.data, values.ctypes.data,
                           values.nbytes)
            one = np.array([counts[name]], np.float32)
            ctypes.memmove(ctypes.cast(cnt, ctypes.POINTER(GgmlTensor)).contents.data, one.ctypes.data, 4)
            ggml.gguf_add_tensor(g, in_sum2)
            ggml.gguf_add_tensor(g, cnt)
        assert ggml.gguf_write_to_file(g, path.encode(), False)
    finally:
        ggml.gguf_free(g)
        ggml.ggml_free(ctx)
