"""Sweeps: config parsing, Pareto front, outputs, and the CI sweep (8 variants, resume)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from jaxquant import cli
from jaxquant.errors import JaxquantError
from jaxquant.eval import sweep as S

CI_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "gemma-ci.yaml"


def _row(name, bpw, kld, ppl):
    return {"variant": name, "policy": name, "bytes": int(bpw * 1e6), "bpw": bpw, "ppl": ppl, "ppl_error": 0.1,
            "ppl_ratio": 1.0, "kld_mean": kld, "kld_error": 0.0, "kld_p99": kld * 5, "same_top_p": 0.9,
            "p_diff_rms": 0.01, "tokens_per_s": 100.0, "compiles": 1, "seconds": 1.0}


def test_pareto_and_outputs(tmp_path):
    rows = [_row("a", 8.5, 0.001, 10), _row("b", 4.5, 0.05, 11), _row("c", 5.0, 0.06, 10.5), _row("d", 3.4, 0.2, 13)]
    assert S.pareto_front(rows, "kld_mean") == [0, 1, 3]
    assert S.pareto_front(rows, "ppl") == [0, 1, 2, 3]
    S.write_results(rows, tmp_path, "t")
    md = (tmp_path / "results.md").read_text()
    assert "| b * |" in md and "| c |" in md
    assert [r["variant"] for r in csv.DictReader(open(tmp_path / "results.csv"))] == ["a", "b", "c", "d"]
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_config(tmp_path):
    cfg = S.read_config(CI_CONFIG, tmp_path)
    assert len(cfg.variants) >= 8 and cfg.variants[0].policy is None and cfg.out == tmp_path
    p = tmp_path / "s.yaml"
    p.write_text("text: {words: 10}\ngrid: {presets: [Q4_0, Q8_0], format: Q8_0, role: [attn_v, ffn_down], "
                 "layers: 'first 25%'}\n")
    names = [v.name for v in S.read_config(p).variants]
    assert names == ["Q4_0+attn_v@first 25%=Q8_0", "Q4_0+ffn_down@first 25%=Q8_0",
                     "Q8_0+attn_v@first 25%=Q8_0", "Q8_0+ffn_down@first 25%=Q8_0"]
    p.write_text("text: {words: 10}\nvariants: [{name: a}, {name: a}]\n")
    with pytest.raises(JaxquantError, match="distinct"):
        S.read_config(p)
    p.write_text("txt: 1\n")
    with pytest.raises(JaxquantError, match="unknown key 'txt'"):
        S.read_config(p)
    gate = S.read_config(CI_CONFIG.with_name("dynamic-gate-gemma.yaml"), tmp_path)
    assert gate.imatrix.ctx == 128 and gate.imatrix.chunks == 16 and gate.imatrix_path == str(tmp_path / "imatrix.gguf")
    assert [v.name for v in gate.variants][1:3] == ["IQ1_S", "IQ1_S DynamicGate"]
    p.write_text("text: {words: 10}\nimatrix: im.gguf\nmodel: package:no_such_pkg/m.gguf\nvariants: [{name: a}]\n")
    with pytest.raises(JaxquantError, match="package 'no_such_pkg' is not installed"):
        S.read_config(p)
    p.write_text("text: {words: 10}\nimatrix: im.gguf\nvariants: [{name: a}]\n")
    assert S.read_config(p).imatrix_path == str(tmp_path / "im.gguf")


@pytest.mark.slow
def test_ci_sweep_and_resume(tmp_path, capsys):
    assert cli.main(["sweep", str(CI_CONFIG), "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) >= 8 and all(float(r["kld_mean"]) > -1e-6 for r in rows)  # 16-bit base: ~0 for itself
    assert float(rows[0]["kld_mean"]) < 1e-4  # the stored model against itself
    assert (tmp_path / "plot.png").exists() and "Pareto" in (tmp_path / "results.md").read_text()
    print(first)
    # an interrupted sweep: one variant missing -> only it runs again
    (tmp_path / "variants" / "Q4_0.json").unlink()
    assert cli.main(["sweep", str(CI_CONFIG), "--out", str(tmp_path)]) == 0
    again = capsys.readouterr().out
    assert again.count("skipped") == len(rows) - 1 and "[Q4_0] bpw" in again
