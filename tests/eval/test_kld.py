"""KL-divergence vs a numpy transcription of perplexity.cpp (log_softmax with the base file,
kl_divergence()'s accumulators and report), the base file format, and the CLI."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from jaxquant.eval.synthetic import english_text

import jaxquant
from jaxquant import cli
from jaxquant.errors import FileFormatError
from jaxquant.eval import kld as K


def c_nearest_int(x: np.float32) -> int:
    return int(np.rint(np.float32(x)))  # ggml's magic-number trick = round half to even


def ref_base_row(logits: np.ndarray, tok: int) -> tuple[np.ndarray, float]:
    """perplexity.cpp log_softmax(n_vocab, logits, log_prob, tok) on one position."""
    f = np.float32
    mx, mn = logits.max(), logits.min()
    mn = max(mn, f(mx - f(16)))
    sum_exp = np.exp(logits - mx).astype(np.float64).sum()
    lse = f(math.log(sum_exp))
    min_lp = f(f(mn - mx) - lse)
    scale = f(f(mx - mn) / f(65535))
    row = np.zeros(K.row_width(len(logits)), np.uint16)
    row[:4] = np.array([scale, min_lp], np.float32).view(np.uint16)
    if scale:
        inv = f(1) / scale
        q = np.rint((inv * (logits - mn)).astype(np.float32))
        row[4:4 + len(logits)] = np.where(logits > mn, q, 0)
    return row, float(f(mx) + np.float64(lse) - logits[tok])


def ref_token(logits: np.ndarray, row: np.ndarray, tok: int) -> tuple[float, float, float, float, bool]:
    """perplexity.cpp log_softmax(..., base_log_prob, tok, kld): (nll, nll_base, kld, p_diff, same top)."""
    f = np.float32
    imax = int(np.argmax(logits))
    mx = logits[imax]
    lse = f(math.log(np.exp(logits - mx).astype(np.float64).sum()))
    scale, min_lp = row[:4].view(np.float32)
    q = row[4:4 + len(logits)].astype(np.float32)
    nll = f(f(mx + lse) - logits[tok])
    plb = (scale * q + min_lp).astype(np.float32)
    nll_base = -plb[tok]
    keep = plb > -16
    kld = (np.exp(plb[keep]) * ((plb[keep] - logits[keep]) + f(mx + lse))).astype(np.float64).sum()
    return nll, nll_base, kld, f(np.exp(-nll) - np.exp(-nll_base)), imax == int(np.argmax(plb))


def ref_report(tok: list[tuple]) -> dict[str, float]:
    """kl_divergence()'s double accumulators and final statistics, transcribed."""
    s = dict.fromkeys(["nll", "nll2", "b", "b2", "nb", "kld", "kld2", "pd", "pd2", "pd4"], 0.0)
    same = 0
    for nll, nb, kld, pd, top in tok:
        s["nll"] += nll; s["nll2"] += float(np.float32(nll * nll)); s["b"] += nb  # noqa: E702
        s["b2"] += float(np.float32(nb * nb)); s["nb"] += float(np.float32(nll * nb)); s["kld"] += kld  # noqa: E702
        s["kld2"] += kld * kld; s["pd"] += pd; s["pd2"] += float(pd) ** 2; s["pd4"] += float(pd) ** 4  # noqa: E702
        same += top
    n = len(tok)

    def mu(a, b):
        f = a / n
        d = b / n - f * f
        return f, (math.sqrt(d / (n - 1)) if d > 0 and n > 10 else 0.0)

    lq, lb = mu(s["nll"], s["nll2"]), mu(s["b"], s["b2"])
    cov = (s["nb"] / n - s["nll"] / n * (s["b"] / n)) / (n - 1)
    kv = sorted(np.float32(t[2]) for t in tok)
    pv = sorted(np.float32(t[3]) for t in tok)

    def pct(v, fr):
        p = np.float32(fr) * np.float32(len(v) - 1)
        ip = int(p)
        p = np.float32(p - ip)
        return float((1 - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])

    mse = mu(s["pd2"], s["pd4"])
    out = {"ppl": math.exp(lq[0]), "ppl_base": math.exp(lb[0]), "ln_ppl_correlation": cov / (lq[1] * lb[1]),
           "mean_ln_ppl_ratio": lq[0] - lb[0], "ppl_ratio": math.exp(lq[0] - lb[0]),
           "kld_mean": mu(s["kld"], s["kld2"])[0], "kld_error": mu(s["kld"], s["kld2"])[1],
           "kld_max": float(kv[-1]), "kld_min": float(kv[0]), "p_diff_mean": mu(s["pd"], s["pd2"])[0],
           "p_diff_rms": math.sqrt(mse[0]), "same_top_p": same / n}
    out.update({f"kld_p{100 * fr:g}": pct(kv, fr) for fr in K.PERCENTILES})
    out.update({f"p_diff_p{100 * fr:g}": pct(pv, fr) for fr in K.P_DIFF_PERCENTILES})
    return out


def test_token_kld_and_statistics_vs_perplexity_cpp():
    rng = np.random.default_rng(0)
    n, v = 400, 997
    base_logits = (rng.standard_normal((n, v)) * rng.uniform(1, 6, (n, 1))).astype(np.float32)
    base_logits[0, :] = 3.0  # a flat row: scale 0
    logits = (base_logits + rng.standard_normal((n, v)).astype(np.float32) * 0.4).astype(np.float32)
    targets = rng.integers(0, v, n)
    rows = np.stack([ref_base_row(base_logits[i], targets[i])[0] for i in range(n)])
    ours = {k: np.asarray(a) for k, a in K.token_kld(jnp.asarray(logits), jnp.asarray(targets),
                                                      jnp.asarray(rows)).items()}
    ref = [ref_token(logits[i], rows[i], targets[i]) for i in range(n)]
    for j, key in enumerate(["nll", "nll_base", "kld", "p_diff"]):
        np.testing.assert_allclose(ours[key], [r[j] for r in ref], rtol=2e-5, atol=2e-6, err_msg=key)
    assert (ours["same_top"] == [r[4] for r in ref]).all()
    stats, expect = K.kld_statistics(ours), ref_report(ref)
    for key, value in expect.items():
        assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert "Same top p" in K.format_report(stats)


@pytest.fixture(scope="module")
def model():
    return jaxquant.load()


def test_base_file_vs_perplexity_cpp_and_self_kld(model, tmp_path):
    from jaxquant import text as text_chunks
    from jaxquant.eval import perplexity as pp

    text = english_text(250, seed=5)
    path = tmp_path / "base.kld"
    ppl = K.save_base(model, path, text, n_ctx=64, n_chunks=2, show_progress=False)
    base = K.read_base(path)
    tokens = text_chunks.tokenize(model.tokenizer, text)
    assert (base.n_ctx, base.n_vocab, base.n_chunk) == (64, model.cfg.vocab_size, 2)
    assert (base.tokens.ravel() == tokens[:128]).all()
    assert path.stat().st_size == 20 + 4 * 128 + 2 * 2 * 31 * K.row_width(model.cfg.vocab_size)
    # the rows are what perplexity.cpp writes for our logits (rounding ties aside)
    chunks = text_chunks.make_chunks(tokens, 64, 2, model.tokenizer.bos_id)
    logits = np.asarray(pp.scored_logits(model.params, jnp.asarray(chunks), model.cfg))
    for c, i in [(0, 0), (1, 30)]:
        row, _ = ref_base_row(logits[c, i], chunks[c, 33 + i])
        np.testing.assert_allclose(base.log_probs[c, i, :4].view(np.float32), row[:4].view(np.float32), rtol=1e-6)
        assert np.abs(base.log_probs[c, i].astype(int) - row.astype(int))[4:].max() <= 1
    assert ppl == pytest.approx(pp.perplexity(model, text, n_ctx=64, n_chunks=2, show_progress=False).ppl, rel=1e-4)
    res = K.kl_divergence(model, path, show_progress=False)
    s = res.stats
    # the base file stores log-probs rounded to 16 bits, so a model against its own base scores a
    # KLD of zero up to that rounding, of either sign
    assert s["count"] == 62 and s["same_top_p"] == 1.0 and abs(s["kld_mean"]) < 1e-5 and abs(s["ppl_ratio"] - 1) < 1e-4


def test_cli_and_bad_file(model, tmp_path, capsys):
    text, base = tmp_path / "t.txt", tmp_path / "b.kld"
    text.write_text(english_text(250, seed=6))
    assert cli.main(["kld", "default", "--base", str(base), "--file", str(text), "--ctx", "64", "--chunks", "2"]) == 0
    capsys.readouterr()
    assert cli.main(["kld", "default", "--base", str(base), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["count"] == 62 and stats["same_top_p"] == 1.0
    (tmp_path / "bad").write_bytes(b"nope")
    with pytest.raises(FileFormatError, match="_logits_"):
        K.read_base(tmp_path / "bad")


@pytest.mark.slow
def test_q4_0_vs_float_matches_llama_cpp(model, tmp_path):
    """Acceptance: a Q4_0 requantization (llama-quantize's from the float file; jaxquant's ISQ)
    against the float model: mean KLD within 10% and same-top-p within 1 point of llama.cpp's."""
    import ctypes

    import llama_cpp

    from jaxquant import text as text_chunks
    from jaxquant.eval import perplexity as pp
    from jaxquant.io import open_model
    from jaxquant.isq.apply import write_quantized_gguf
    from jaxquant.isq.mixes import FTYPES
    from jaxquant.isq.policy import Policy

    n_ctx, n_chunks = 512, 4
    f32, q4 = str(tmp_path / "f32.gguf"), str(tmp_path / "q4_0.gguf")
    write_quantized_gguf(open_model(model.path), Policy(default="F32"), f32, show_progress=False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = FTYPES["Q4_0"][0], 2
    assert llama_cpp.llama_model_quantize(f32.encode(), q4.encode(), ctypes.byref(params)) == 0

    text = english_text(3000, seed=7)
    base_model = jaxquant.load(f32)
    K.save_base(base_model, tmp_path / "base.kld", text, n_ctx=n_ctx, n_chunks=n_chunks, show_progress=False)
    ours = K.kl_divergence(pp.load_model(f32, "Q4_0"), tmp_path / "base.kld", show_progress=False).stats

    tokens = text_chunks.tokenize(base_model.tokenizer, text)
    chunks = text_chunks.make_chunks(tokens, n_ctx, n_chunks, base_model.tokenizer.bos_id)
    first, per_token = n_ctx // 2, []
    logits = {}
    for path in (f32, q4):
        llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=2, verbose=False)
        logits[path] = []
        for chunk in chunks:
            llm.reset()
            llm.eval(chunk.tolist())
            logits[path].append(np.array(llm.scores[first:n_ctx - 1], np.float32))
        del llm
    for c, chunk in enumerate(chunks):
        for i in range(n_ctx - 1 - first):
            tok = chunk[first + 1 + i]
            row, _ = ref_base_row(logits[f32][c][i], tok)
            per_token.append(ref_token(logits[q4][c][i], row, tok))
    ref = ref_report(per_token)
    print(f"\nQ4_0 vs F32: mean KLD jaxquant {ours['kld_mean']:.5f}, llama.cpp {ref['kld_mean']:.5f}; same top p "
          f"{ours['same_top_p']:.2%} vs {ref['same_top_p']:.2%}; PPL ratio {ours['ppl_ratio']:.4f} vs "
          f"{ref['ppl_ratio']:.4f}")
    assert abs(ours["kld_mean"] / ref["kld_mean"] - 1) < 0.10
    assert abs(ours["same_top_p"] - ref["same_top_p"]) < 0.01
