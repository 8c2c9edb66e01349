"""Text into the token chunks that llama.cpp's evaluation and calibration tools run on
(``llama-perplexity``, ``llama-imatrix``): tokenized once, cut into non-overlapping windows.

It sits below both ``eval`` (perplexity, KLD) and ``isq`` (imatrix collection), so that neither
imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxquant.errors import JaxquantError


def tokenize(tokenizer, text: str) -> list[int]:
    """The text's tokens as llama-perplexity and llama-imatrix have them:
    ``common_tokenize(text, add_special=true)`` (BOS when the vocabulary adds it), special-token
    text not parsed. ``tokenizer``: a model's ``jaxquant.io.tokenizer.Tokenizer`` (None: an error)."""
    if tokenizer is None:
        raise JaxquantError("evaluating a text needs a model with a tokenizer")
    if tokenizer.add_eos:
        raise JaxquantError("llama-perplexity refuses vocabularies that append EOS; so does jaxquant")
    return tokenizer.encode(text, add_bos=None, parse_special=False)


def check_chunking(n_ctx: int | None = None, n_chunks: int | None = None, batch: int = 1) -> None:
    """Refuse settings that llama.cpp's tools refuse or that select nothing, before any work:
    ``n_ctx`` an even number >= 4, ``n_chunks`` None or negative (all) or >= 1, ``batch`` >= 1."""
    if n_ctx is not None and (n_ctx < 4 or n_ctx % 2):
        raise JaxquantError(f"n_ctx={n_ctx}: must be an even number >= 4")
    if n_chunks == 0:
        raise JaxquantError("n_chunks=0 selects no chunk: give a count >= 1, or a negative one (or none) for all")
    if batch < 1:
        raise JaxquantError(f"batch={batch}: must be >= 1 (chunks per device call)")


def make_chunks(tokens: Sequence[int], n_ctx: int, n_chunks: int | None, bos_id: int | None) -> np.ndarray:
    """int32 [n_chunks, n_ctx]: consecutive non-overlapping windows, the first token of each
    replaced by ``bos_id`` (None: left as is). At least 2 * n_ctx tokens are needed, as in llama.cpp;
    ``n_chunks`` None or negative: all of them."""
    check_chunking(n_ctx, n_chunks)
    if len(tokens) < 2 * n_ctx:
        raise JaxquantError(f"the text has {len(tokens)} tokens; a context of {n_ctx} needs at least {2 * n_ctx}")
    available = len(tokens) // n_ctx
    n = available if n_chunks is None or n_chunks < 0 else min(n_chunks, available)
    out = np.asarray(tokens[:n * n_ctx], np.int32).reshape(n, n_ctx).copy()
    if bos_id is not None:
        out[:, 0] = bos_id
    return out


__all__ = ["check_chunking", "make_chunks", "tokenize"]
