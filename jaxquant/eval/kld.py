"""KL-divergence of a model against a base model, as ``llama-perplexity --kl-divergence``.

The base run writes llama.cpp's ``--kl-divergence-base`` file (tools/perplexity/perplexity.cpp):
``"_logits_"``, uint32 n_ctx, int32 n_vocab, int32 n_chunk, int32 tokens[n_chunk * n_ctx], then
for each chunk and scored position ``nv = 2 * ((n_vocab + 1) // 2) + 4`` uint16: two float32
(scale, min_log_prob) and the log-probs quantized to 16 bits over [max - 16, max] (0 below),
zero padding. Files are interchangeable with llama.cpp's. The comparison run evaluates the same
chunks and reports llama.cpp's statistics (KLD, delta-p, same top p, PPL ratio and correlation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import FileFormatError, JaxquantError
from jaxquant.eval.perplexity import DEFAULT_CTX, iter_batches, scored_logits, scored_targets
from jaxquant.formats.numerics import mul
from jaxquant.model import Model
from jaxquant.text import check_chunking, make_chunks, tokenize

MAGIC = b"_logits_"
PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.10, 0.05, 0.01, 0.001)  # llama.cpp's KLD percentiles
P_DIFF_PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.75, 0.25, 0.10, 0.05, 0.01, 0.001)


def row_width(n_vocab: int) -> int:
    """uint16 per scored position in the file: 2 float32 + n_vocab, rounded up to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


@dataclasses.dataclass
class BaseLogProbs:
    """A base file opened lazily: ``log_probs`` is a uint16 memmap [n_chunk, n_ctx - 1 - n_ctx/2, nv]."""

    n_ctx: int
    n_vocab: int
    tokens: np.ndarray  # int32 [n_chunk, n_ctx], the original tokens (BOS not yet put in)
    log_probs: np.ndarray

    @property
    def n_chunk(self) -> int:
        return len(self.tokens)


def read_base(path: str | os.PathLike) -> BaseLogProbs:
    """Open a base log-prob file written by ``save_base`` or by llama-perplexity."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError as e:
        raise FileFormatError(f"{path}: cannot read the base log-probabilities ({e.strerror})") from None
    if len(head) < 20 or head[:8] != MAGIC:
        raise FileFormatError(f"{path}: not a log-probability file (no '_logits_' header); write one with "
                              "`jaxquant kld MODEL --base FILE --file TEXT` or llama-perplexity --kl-divergence-base")
    n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(head[8:20], np.int32))
    n_tok, nv = n_ctx - 1 - n_ctx // 2, row_width(n_vocab)
    offset = 20 + 4 * n_chunk * n_ctx
    if path.stat().st_size < offset + 2 * n_chunk * n_tok * nv:
        raise FileFormatError(f"{path}: truncated: {n_chunk} chunks of {n_ctx} (vocabulary {n_vocab}) need "
                              f"{offset + 2 * n_chunk * n_tok * nv} bytes, the file has {path.stat().st_size}")
    tokens = np.fromfile(path, np.int32, n_chunk * n_ctx, offset=20).reshape(n_chunk, n_ctx)
    log_probs = np.memmap(path, np.uint16, "r", offset, (n_chunk, n_tok, nv))
    return BaseLogProbs(n_ctx, n_vocab, tokens, log_probs)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _base_chunk(params, chunks, targets, cfg, dtype):
    # perplexity.cpp log_softmax(n_vocab, logits, log_prob, tok): the range [max - 16, max] in 65535 steps.
    x = scored_logits(params, chunks, cfg, dtype)
    mx, mn = x.max(-1), x.min(-1)
    mn = jnp.maximum(mn, mx - 16)
    lse = jnp.log(jnp.exp(x - mx[..., None]).sum(-1))
    scale = (mx - mn) / 65535.0
    q = jnp.rint((1 / scale)[..., None] * (x - mn[..., None]))  # ggml's nearest_int: round half to even
    q = jnp.where((x > mn[..., None]) & (scale[..., None] != 0), q, 0).astype(jnp.uint16)
    header = jnp.stack([scale, mn - mx - lse], -1)
    nll = mx + lse - jnp.take_along_axis(x, targets[..., None], -1)[..., 0]
    return q, header, nll


def save_base(model: Model, path: str | os.PathLike, text: str | None = None, *, tokens=None,
              n_ctx: int = DEFAULT_CTX, n_chunks: int | None = None, batch: int = 1,
              show_progress: bool | None = None) -> float:
    """Write ``model``'s quantized log-probs of the text's chunks to ``path`` (llama.cpp's
    format); returns the base PPL (from the same float values llama.cpp uses there)."""
    from tqdm.auto import tqdm

    check_chunking(n_ctx, n_chunks, batch)
    tokens = tokenize(model.tokenizer, text) if tokens is None else list(tokens)
    original = make_chunks(tokens, n_ctx, n_chunks, None)
    chunks = _with_bos(model, original)
    nv, n_vocab = row_width(model.cfg.vocab_size), model.cfg.vocab_size
    total, count = 0.0, 0
    with open(path, "wb") as f, tqdm(total=len(chunks), unit="chunk", desc="kld base", dynamic_ncols=True,
                                     disable=None if show_progress is None else not show_progress) as bar:
        f.write(MAGIC + np.array([n_ctx, n_vocab, len(chunks)], np.int32).tobytes() + original.tobytes())
        for part, n in iter_batches(chunks, batch):
            q, header, nll = (np.asarray(a)[:n] for a in _base_chunk(
                model.params, jnp.asarray(part), jnp.asarray(scored_targets(part)), model.cfg, model.compute_dtype))
            rows = np.zeros(q.shape[:2] + (nv,), np.uint16)
            rows[..., :4] = header.astype(np.float32).view(np.uint16)
            rows[..., 4:4 + n_vocab] = q
            f.write(rows.tobytes())
            total, count = total + nll.astype(np.float64).sum(), count + nll.size
            bar.set_postfix_str(f"ppl {math.exp(total / count):.4f}", refresh=False)
            bar.update(n)
    return math.exp(total / count)


def _with_bos(model: Model, chunks: np.ndarray) -> np.ndarray:
    tok = model.tokenizer
    if tok is not None and tok.add_bos and tok.bos_id is not None:
        chunks = chunks.copy()
        chunks[:, 0] = tok.bos_id
    return chunks


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _kld_chunk(params, chunks, targets, base, cfg, dtype):
    x = scored_logits(params, chunks, cfg, dtype)
    return token_kld(x, targets, base)


def token_kld(x: jax.Array, targets: jax.Array, base: jax.Array) -> dict[str, jax.Array]:
    """perplexity.cpp's per-token quantities: logits x f32 [..., V], base rows uint16 [..., nv]
    -> nll, nll_base, kld, p_diff (float32) and same_top (bool), each [...]."""
    v = x.shape[-1]
    header = jax.lax.bitcast_convert_type(base[..., :4].reshape(base.shape[:-1] + (2, 2)), jnp.float32)
    scale, min_lp = header[..., 0:1], header[..., 1:2]
    mx = x.max(-1)
    imax = jnp.argmax(x, -1)  # the first maximum, as the C's strict '>'
    lse = jnp.log(jnp.exp(x - mx[..., None]).sum(-1))
    p_log_base = mul(scale, base[..., 4:4 + v].astype(jnp.float32)) + min_lp
    picked = jnp.take_along_axis(x, targets[..., None], -1)[..., 0]
    nll = mx + lse - picked
    nll_base = -jnp.take_along_axis(p_log_base, targets[..., None], -1)[..., 0]
    terms = jnp.exp(p_log_base) * (p_log_base - x + (mx + lse)[..., None])
    kld = jnp.where(p_log_base > -16.0, terms, 0.0).sum(-1)
    same_top = imax == jnp.argmax(p_log_base, -1)
    return {"nll": nll, "nll_base": nll_base, "kld": kld, "p_diff": jnp.exp(-nll) - jnp.exp(-nll_base),
            "same_top": same_top}


def _mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)


def _covariance(a: float, b: float, ab: float, count: int) -> float:
    return 0.0 if count < 10 else (ab / count - (a / count) * (b / count)) / (count - 1)


def _percentile(values: np.ndarray, fraction: float) -> float:
    # llama.cpp's: linear interpolation with float arithmetic on the sorted values.
    if fraction <= 0:
        return float(values[0])
    if fraction >= 1:
        return float(values[-1])
    p = np.float32(fraction) * np.float32(len(values) - 1)
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    return float((np.float32(1) - p) * values[ip] + p * values[min(ip + 1, len(values) - 1)])


def _median(values: np.ndarray) -> float:
    n = len(values)
    return float(np.float32(0.5) * (values[n // 2] + values[n // 2 - 1]) if n % 2 == 0 else values[n // 2])


def kld_statistics(tok: dict[str, np.ndarray]) -> dict[str, float]:
    """llama.cpp's final report from per-token arrays (float32 nll, nll_base, kld, p_diff; bool
    same_top): sums in double of the float values, as kl_divergence() accumulates them."""
    f64 = {k: np.asarray(tok[k], np.float32).ravel().astype(np.float64) for k in ("nll", "nll_base", "kld")}
    p_diff32 = np.asarray(tok["p_diff"], np.float32).ravel()
    p_diff, count = p_diff32.astype(np.float64), f64["nll"].size
    sq = {k: (np.asarray(tok[k], np.float32).ravel() ** 2).astype(np.float64) for k in ("nll", "nll_base")}
    nll_nll_base = (np.asarray(tok["nll"], np.float32) * np.asarray(tok["nll_base"], np.float32)).ravel()
    p_diff2 = p_diff * p_diff
    ln_q = _mean_and_uncertainty(f64["nll"].sum(), sq["nll"].sum(), count)
    ln_b = _mean_and_uncertainty(f64["nll_base"].sum(), sq["nll_base"].sum(), count)
    cov = _covariance(f64["nll"].sum(), f64["nll_base"].sum(), nll_nll_base.astype(np.float64).sum(), count)
    ratio, ratio_unc = ln_q[0] - ln_b[0], math.sqrt(max(ln_q[1] ** 2 + ln_b[1] ** 2 - 2 * cov, 0.0))
    ppl, ppl_base = math.exp(ln_q[0]), math.exp(ln_b[0])
    kld = _mean_and_uncertainty(f64["kld"].sum(), (f64["kld"] ** 2).sum(), count)
    mse = _mean_and_uncertainty(p_diff2.sum(), (p_diff2 * p_diff2).sum(), count)
    dp = _mean_and_uncertainty(p_diff.sum(), p_diff2.sum(), count)
    same = float(np.count_nonzero(tok["same_top"])) / count
    kv, pv = np.sort(np.asarray(tok["kld"], np.float32).ravel()), np.sort(p_diff32)
    out: dict[str, float] = {
        "count": count, "ppl": ppl, "ppl_error": ppl * ln_q[1], "ppl_base": ppl_base,
        "ppl_base_error": ppl_base * ln_b[1],
        "ln_ppl_correlation": cov / (ln_q[1] * ln_b[1]) if ln_q[1] and ln_b[1] else math.nan,
        "mean_ln_ppl_ratio": ratio, "mean_ln_ppl_ratio_error": ratio_unc,
        "ppl_ratio": math.exp(ratio), "ppl_ratio_error": math.exp(ratio) * ratio_unc,
        "ppl_diff": ppl - ppl_base,
        "ppl_diff_error": math.sqrt(max((ppl * ln_q[1]) ** 2 + (ppl_base * ln_b[1]) ** 2
                                        - 2 * ppl * ppl_base * cov, 0.0)),
        "kld_mean": kld[0], "kld_error": kld[1], "kld_max": float(kv[-1]), "kld_median": _median(kv),
        "kld_min": float(kv[0]),
        "p_diff_mean": dp[0], "p_diff_error": dp[1], "p_diff_max": float(pv[-1]), "p_diff_median": _median(pv),
        "p_diff_min": float(pv[0]), "p_diff_rms": math.sqrt(mse[0]),
        "p_diff_rms_error": 0.5 / math.sqrt(mse[0]) * mse[1] if mse[0] > 0 else 0.0,
        "same_top_p": same, "same_top_p_error": math.sqrt(same * (1 - same) / (count - 1)) if count > 1 else 0.0,
    }
    for f in PERCENTILES:
        out[f"kld_p{100 * f:g}"] = _percentile(kv, f)
    for f in P_DIFF_PERCENTILES:
        out[f"p_diff_p{100 * f:g}"] = _percentile(pv, f)
    return out


@dataclasses.dataclass
class KLDResult:
    """``stats``: llama.cpp's report (``kld_statistics``); ``tokens``: the per-token arrays."""

    stats: dict[str, Any]
    tokens: dict[str, np.ndarray] = dataclasses.field(repr=False)
    seconds: float = 0.0
    tokens_per_s: float = 0.0


def kl_divergence(model: Model, base: str | os.PathLike | BaseLogProbs, *, n_chunks: int | None = None,
                  batch: int = 1, show_progress: bool | None = None) -> KLDResult:
    """Evaluate ``model`` on the chunks stored in the ``base`` file and compare its token
    distributions with the stored ones, as ``llama-perplexity --kl-divergence``."""
    from tqdm.auto import tqdm

    check_chunking(None, n_chunks, batch)
    base = base if isinstance(base, BaseLogProbs) else read_base(base)
    if base.n_vocab != model.cfg.vocab_size:
        raise JaxquantError(f"the base file has a vocabulary of {base.n_vocab}, the model {model.cfg.vocab_size}")
    n = base.n_chunk if n_chunks is None or n_chunks < 0 else min(n_chunks, base.n_chunk)
    chunks = _with_bos(model, base.tokens[:n])
    parts: dict[str, list[np.ndarray]] = {}
    start, warm = time.perf_counter(), None
    with tqdm(total=n, unit="chunk", desc="kld", dynamic_ncols=True,
              disable=None if show_progress is None else not show_progress) as bar:
        for i, (part, m) in enumerate(iter_batches(chunks, batch)):
            rows = np.asarray(base.log_probs[i * batch:i * batch + m])
            if m < batch:
                rows = np.concatenate([rows, np.repeat(rows[-1:], batch - m, 0)])
            out = _kld_chunk(model.params, jnp.asarray(part), jnp.asarray(scored_targets(part)), jnp.asarray(rows),
                             model.cfg, model.compute_dtype)
            for k, v in out.items():
                parts.setdefault(k, []).append(np.asarray(v)[:m].ravel())
            warm = warm or (time.perf_counter(), m)
            kld = np.concatenate(parts["kld"])
            bar.set_postfix_str(f"kld {kld.astype(np.float64).mean():.5f}", refresh=False)
            bar.update(m)
    end = time.perf_counter()
    tokens = {k: np.concatenate(v) for k, v in parts.items()}
    timed = n - warm[1]
    tps = timed * base.n_ctx / (end - warm[0]) if timed else n * base.n_ctx / (end - start)
    return KLDResult(kld_statistics(tokens), tokens, end - start, tps)


def format_report(stats: dict[str, float]) -> str:
    """The statistics in llama-perplexity's layout."""
    s = stats
    lines = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_error']:10.6f}",
             f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_error']:10.6f}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['ln_ppl_correlation']:6.2f}%",
             f"Mean ln(PPL(Q)/PPL(base))     : {s['mean_ln_ppl_ratio']:10.6f} ± {s['mean_ln_ppl_ratio_error']:10.6f}",
             f"Mean PPL(Q)/PPL(base)         : {s['ppl_ratio']:10.6f} ± {s['ppl_ratio_error']:10.6f}",
             f"Mean PPL(Q)-PPL(base)         : {s['ppl_diff']:10.6f} ± {s['ppl_diff_error']:10.6f}", "",
             "====== KL divergence statistics ======",
             f"Mean    KLD: {s['kld_mean']:10.6f} ± {s['kld_error']:10.6f}",
             f"Maximum KLD: {s['kld_max']:10.6f}"]
    lines += [f"{100 * f:4.1f}%   KLD: {s[f'kld_p{100 * f:g}']:10.6f}" for f in PERCENTILES[:4]]
    lines.append(f"Median  KLD: {s['kld_median']:10.6f}")
    lines += [f"{100 * f:4.1f}%   KLD: {s[f'kld_p{100 * f:g}']:10.6f}" for f in PERCENTILES[4:]]
    lines += [f"Minimum KLD: {s['kld_min']:10.6f}", "", "====== Token probability statistics ======",
              f"Mean    Δp: {100 * s['p_diff_mean']:6.3f} ± {100 * s['p_diff_error']:5.3f} %",
              f"Maximum Δp: {100 * s['p_diff_max']:6.3f}%"]
    lines += [f"{100 * f:4.1f}%   Δp: {100 * s[f'p_diff_p{100 * f:g}']:6.3f}%" for f in P_DIFF_PERCENTILES[:5]]
    lines.append(f"Median  Δp: {100 * s['p_diff_median']:6.3f}%")
    lines += [f"{100 * f:4.1f}%   Δp: {100 * s[f'p_diff_p{100 * f:g}']:6.3f}%" for f in P_DIFF_PERCENTILES[5:]]
    lines += [f"Minimum Δp: {100 * s['p_diff_min']:6.3f}%",
              f"RMS Δp    : {100 * s['p_diff_rms']:6.3f} ± {100 * s['p_diff_rms_error']:5.3f} %",
              f"Same top p: {100 * s['same_top_p']:6.3f} ± {100 * s['same_top_p_error']:5.3f} %"]
    return "\n".join(lines)


__all__ = ["save_base", "read_base", "kl_divergence", "kld_statistics", "token_kld", "format_report",
           "BaseLogProbs", "KLDResult", "row_width"]
