"""llama.cpp as the oracle: its own quantizers (ggml_quantize_chunk in libggml-base) via ctypes,
llama_model_quantize, greedy decoding and llama-perplexity's NLL on its logits.

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
                   imatrix: dict[str, np.ndarray] | None = None, requantize: bool = False) -> None:
    """llama_model_quantize (2 threads, as llama-quantize) of the GGUF ``src`` into ``dst``; ``imatrix``:
    tensor name -> importance weights (what llama-quantize reads from an imatrix file); ``requantize``:
    --allow-requantize (``src`` already quantized)."""
    import llama_cpp
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(False)  # no per-tensor log
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread, params.allow_requantize = ftype, pure, 2, requantize
    keep = []
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # a zeroed entry ends the list
        for i, (name, w) in enumerate(sorted(imatrix.items())):
            keep.append(np.ascontiguousarray(w, np.float32))
            entries[i].name, entries[i].size = name.encode(), keep[-1].size
            entries[i].data = keep[-1].ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = entries
    assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) == 0


def greedy(path: str, prompts: list[list[int]], eog: frozenset[int], n_tokens: int, **options) -> list[list[int]]:
    """llama.cpp's greedy continuation (2 threads, the argmax of its logits after every token) of each
    prompt's token ids: up to ``n_tokens`` tokens, stopping before an end-of-generation token."""
    import llama_cpp

    llm = llama_cpp.Llama(path, n_threads=2, n_threads_batch=2, n_ctx=256, verbose=False, **options)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        tokens = []
        for _ in range(n_tokens):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))  # the last token's
            token = int(np.argmax(logits))
            if token in eog:
                break
            tokens.append(token)
            llm.eval([token])
        out.append(tokens)
    return out


def divergences(tokenizer, texts: list[str], ours: list[list[int]], ref: list[list[int]]) -> list[str]:
    """One line per prompt whose continuations differ: where, and the next tokens of each side."""
    out = []
    decode = tokenizer.decode
    for text, a, b in zip(texts, ours, ref):
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            out.append(f"{text!r} diverges at token {at} (after {decode(a[:at])!r}): jaxquant {a[at:at + 3]} "
                       f"{decode(a[at:at + 3])!r}, llama.cpp {b[at:at + 3]} {decode(b[at:at + 3])!r}")
    return out


def perplexity_nll(llm, chunks: np.ndarray) -> np.ndarray:
    """llama-perplexity's per-token NLL (log_softmax in perplexity.cpp: float max, expf, double
    sum) on llama.cpp's logits (a ``llama_cpp.Llama`` with logits_all) for each chunk run from an
    empty cache."""
    first = chunks.shape[1] // 2
    out = []
    for chunk in chunks:
        llm.reset()
        llm.eval(chunk.tolist())
        logits = np.array(llm.scores[first:chunks.shape[1] - 1], np.float32)
        m = logits.max(-1)
        sum_exp = np.exp(logits - m[:, None]).astype(np.float64).sum(-1)
        tok = chunk[first + 1:]
        out.append(-((logits[np.arange(len(tok)), tok] - m).astype(np.float64) - np.log(sum_exp)))
    return np.concatenate(out)


def compare_perplexity(model, llm, text: str, n_ctx: int, n_chunks: int | None):
    """jaxquant's perplexity of ``text`` against llama.cpp's on the same tokens and chunks (both
    tokenizers must agree): within 0.5%, its error estimate within 5%. Returns (jaxquant's result,
    llama.cpp's PPL, its error)."""
    from jaxquant import text as text_chunks
    from jaxquant.eval import perplexity as pp

    tokens = text_chunks.tokenize(model.tokenizer, text)
    assert tokens == llm.tokenize(text.encode(), add_bos=True, special=False)  # BOS where the vocabulary adds it
    ours = pp.perplexity(model, text, n_ctx=n_ctx, n_chunks=n_chunks, batch=4, show_progress=False)
    bos = model.tokenizer.bos_id if model.tokenizer.add_bos else None
    chunks = text_chunks.make_chunks(tokens, n_ctx, n_chunks, bos)
    ppl, err = pp.ppl_and_error(perplexity_nll(llm, chunks))
    print(f"\n{len(tokens)} tokens, {ours.n_chunks} chunks: jaxquant PPL {ours.ppl:.4f} +/- {ours.error:.5f}, "
          f"llama.cpp {ppl:.4f} +/- {err:.5f} ({ours.ppl / ppl - 1:+.4%}); {ours.tokens_per_s:.0f} tokens/s")
    assert ours.count == len(chunks) * (n_ctx // 2 - 1)
    assert abs(ours.ppl / ppl - 1) < 0.005 and abs(ours.error / err - 1) < 0.05
    return ours, ppl, err
