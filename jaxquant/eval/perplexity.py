"""Perplexity exactly as llama.cpp's ``llama-perplexity`` computes it (tools/perplexity).

The whole text is tokenized once (BOS first when the vocabulary asks for it), cut into
non-overlapping chunks of ``n_ctx`` tokens (``jaxquant.text``), each chunk's first token replaced
by BOS, and each chunk run from an empty cache. Only the second half is scored: the logits at positions
``n_ctx/2 .. n_ctx-2`` predict the tokens after them, so every scored token has at least
``n_ctx/2`` tokens of context. PPL = exp(mean NLL); its error is llama.cpp's
``sqrt(var(NLL) / (count - 1)) * PPL``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import models
from jaxquant.config import ModelConfig
from jaxquant.errors import JaxquantError
from jaxquant.model import Model
from jaxquant.text import check_chunking, make_chunks, tokenize

DEFAULT_CTX = 512


def load_model(path: str | os.PathLike | None = None, policy=None, imatrix=None) -> Model:
    """``jaxquant.load`` with ``policy`` (a Policy, a mix name such as ``"Q4_0"`` or a YAML file;
    None: the model as stored) applied at load, one tensor at a time."""
    import jaxquant

    return jaxquant.load(path, isq=policy, imatrix=imatrix)


def scored_targets(chunks: np.ndarray) -> np.ndarray:
    """The tokens the scored logits predict: [n_chunks, n_ctx - 1 - n_ctx/2] (the original
    tokens; a chunk's first token, replaced by BOS, is never a target)."""
    first = chunks.shape[1] // 2
    return chunks[:, first + 1:]


def scored_logits(params: models.Params, chunks: jax.Array, cfg: ModelConfig, dtype=jnp.float32) -> jax.Array:
    """float32 logits [B, n_ctx - 1 - n_ctx/2, vocab] of chunks [B, n_ctx] run from an empty
    cache: positions n_ctx/2 .. n_ctx-2 (the vocabulary product only where it is scored)."""
    b, n_ctx = chunks.shape
    positions = jnp.broadcast_to(jnp.arange(n_ctx, dtype=jnp.int32), (b, n_ctx))
    x, _ = models.hidden_states(params, chunks, positions, models.init_cache(cfg, b, n_ctx, dtype), cfg)
    return models.logits(params, x[:, n_ctx // 2:-1], cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _chunk_nll(params, chunks, targets, cfg, dtype):
    # llama.cpp: max, sum of expf(x - max) (a double there; f32 here), nll = max + log(sum) - x[tok].
    logits = scored_logits(params, chunks, cfg, dtype)
    m = logits.max(-1)
    s = jnp.exp(logits - m[..., None]).sum(-1)
    picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return picked - m, s


def chunk_nll(model: Model, chunks: np.ndarray) -> np.ndarray:
    """float64 NLL [B, n_ctx - 1 - n_ctx/2] of the scored tokens of chunks [B, n_ctx]."""
    rel, s = _chunk_nll(model.params, jnp.asarray(chunks), jnp.asarray(scored_targets(chunks)), model.cfg,
                        model.compute_dtype)
    return -(np.asarray(rel, np.float64) - np.log(np.asarray(s, np.float64)))


def ppl_and_error(nll: np.ndarray) -> tuple[float, float]:
    """llama.cpp's final estimate from the NLLs of all scored tokens: (PPL, its +/- error)."""
    nll = np.asarray(nll, np.float64).ravel()
    count = nll.size
    mean, mean2 = nll.sum() / count, (nll * nll).sum() / count
    ppl = math.exp(mean)
    var = mean2 - mean * mean
    return ppl, (math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else math.nan)


@dataclasses.dataclass
class PerplexityResult:
    """``ppl`` +/- ``error`` over ``count`` scored tokens in ``n_chunks`` chunks of ``n_ctx``;
    ``chunk_ppl`` the running estimate after each chunk (llama.cpp's ``[i]ppl`` line);
    ``tokens_per_s`` all evaluated tokens (n_chunks * n_ctx) over the time after the first call."""

    ppl: float
    error: float
    count: int
    n_chunks: int
    n_ctx: int
    n_tokens: int
    chunk_ppl: list[float]
    seconds: float
    tokens_per_s: float
    nll: np.ndarray = dataclasses.field(repr=False)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("nll")
        return d


def iter_batches(chunks: np.ndarray, batch: int) -> Iterator[tuple[np.ndarray, int]]:
    """(chunks [batch, n_ctx], how many are real): the last batch is padded by repeating its
    last chunk so that every call has the same shape (one compilation)."""
    check_chunking(batch=batch)
    for i in range(0, len(chunks), batch):
        part = chunks[i:i + batch]
        n = len(part)
        if n < batch:
            part = np.concatenate([part, np.repeat(part[-1:], batch - n, 0)])
        yield part, n


def perplexity(model: Model, text: str | None = None, *, tokens: Sequence[int] | None = None,
               n_ctx: int = DEFAULT_CTX, n_chunks: int | None = None, batch: int = 1,
               show_progress: bool | None = None) -> PerplexityResult:
    """llama-perplexity's PPL of ``text`` (or of ``tokens``, already tokenized with BOS).

    ``batch`` chunks go through one jitted call (the results do not depend on it); the
    progress bar (None: only on a terminal) shows the running estimate.
    """
    from tqdm.auto import tqdm

    if (text is None) == (tokens is None):
        raise JaxquantError("perplexity: give either text or tokens")
    check_chunking(n_ctx, n_chunks, batch)
    tokens = tokenize(model.tokenizer, text) if tokens is None else list(tokens)
    bos = model.tokenizer.bos_id if model.tokenizer is not None and model.tokenizer.add_bos else None
    chunks = make_chunks(tokens, n_ctx, n_chunks, bos)
    nll, running, start, warm = [], [], time.perf_counter(), None
    bar = tqdm(total=len(chunks), unit="chunk", desc="perplexity", dynamic_ncols=True,
               disable=None if show_progress is None else not show_progress)
    total, count = 0.0, 0
    with bar:
        for part, n in iter_batches(chunks, batch):
            values = chunk_nll(model, part)[:n]
            if not np.isfinite(values).all():
                bad = len(nll) + int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
                raise JaxquantError(f"perplexity: chunk {bad} has NaN/Inf log-likelihoods (the model's logits are "
                                    "not finite): its weights or config hold NaN/Inf or overflow")
            warm = warm or (time.perf_counter(), n)
            for row in values:
                nll.append(row)
                total, count = total + row.sum(), count + row.size
                running.append(math.exp(total / count))
            bar.set_postfix_str(f"ppl {running[-1]:.4f}", refresh=False)
            bar.update(n)
    end = time.perf_counter()
    nll = np.concatenate(nll)
    ppl, err = ppl_and_error(nll)
    timed = len(chunks) - warm[1]
    tps = timed * n_ctx / (end - warm[0]) if timed else len(chunks) * n_ctx / (end - start)
    return PerplexityResult(ppl, err, nll.size, len(chunks), n_ctx, len(tokens), running, end - start, tps, nll)


__all__ = ["perplexity", "PerplexityResult", "load_model", "scored_targets", "scored_logits", "chunk_nll",
           "ppl_and_error", "iter_batches", "DEFAULT_CTX"]
