"""Calibration of the real embedded Gemma-3-270M on CPU (slow suite): GPTQ and AWQ into Q4_0 lower
the KL divergence from the float model (the shipped file dequantized) and the perplexity below
round-to-nearest Q4_0's, on text the calibration did not see (tests/data/shakespeare.txt: first
half for calibration, the second for evaluation). The full-size comparison is
configs/sweeps/calib-gemma.yaml (benchmarks/RESULTS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

import jaxquant as jq
from jaxquant.calib import CalibratedSource, Calibration, calibrate
from jaxquant.eval import kld as K
from jaxquant.io import open_model
from jaxquant.isq.policy import Policy

TEXT = (Path(__file__).parents[1] / "data" / "shakespeare.txt").read_text(encoding="utf-8")
POLICY = Policy(default="Q4_0", embeddings="Q8_0")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gemma_calibration_beats_round_to_nearest(gemma_path, tmp_path, method):
    source = open_model(gemma_path)
    base = tmp_path / "base.kld"
    K.save_base(jq.load(CalibratedSource(source, {})), base, TEXT[55000:], n_ctx=128, n_chunks=6, batch=3)
    results = {}
    for name, calib in (("rtn", Calibration(method="rtn")),
                        (method, Calibration(method=method, n_ctx=128, n_chunks=16, batch=4))):
        model = jq.load(calibrate(source, POLICY, TEXT[:55000], calib), isq=POLICY)
        results[name] = K.kl_divergence(model, base, batch=3).stats
    print({k: (round(s["kld_mean"], 5), round(s["ppl"], 3)) for k, s in results.items()})
    assert results[method]["kld_mean"] < 0.6 * results["rtn"]["kld_mean"]
    assert results[method]["ppl"] < results["rtn"]["ppl"]
