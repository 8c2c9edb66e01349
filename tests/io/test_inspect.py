"""`jaxquant inspect`: the per-type totals plus the header, metadata, tensor-info and padding bytes
add up to the file size; tensor bytes and weights agree with llama.cpp's own count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import llama_model
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxquant.cli import main

LAYOUT_ROWS = ("header", "metadata", "tensor_info", "padding")


def _sections(text: str) -> dict[str, list[list[str]]]:
    """Rows of the totals table, by first word."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["type", "tensors"])
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.setdefault(line.split()[0], []).append(line.split())
    return rows


@pytest.fixture(scope="module")
def gemma_inspect(gemma_path) -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "jaxquant"), "inspect", gemma_path],
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_totals_match_the_file_size_to_the_byte(gemma_path, gemma_inspect):
    rows = _sections(gemma_inspect)
    types = {k: v[0] for k, v in rows.items() if k not in ("tensors", "file", *LAYOUT_ROWS)}
    assert set(types) == {"Q8_0", "Q5_0", "Q4_K", "Q6_K", "F32"}
    per_type = sum(int(r[4]) for r in types.values())
    layout = sum(int(rows[k][0][1]) for k in LAYOUT_ROWS)
    size = os.path.getsize(gemma_path)
    assert per_type + layout == size == int(rows["file"][0][1])
    assert int(rows["tensors"][0][4]) == per_type and int(rows["tensors"][0][1]) == 236
    for _, _, weights, bpw, nbytes in types.values():
        assert abs(float(bpw) - 8 * int(nbytes) / int(weights)) < 1e-4
    # the tensor table: one row per tensor, its bytes adding up to the same totals
    table = [line.split() for line in gemma_inspect.splitlines() if line.startswith(("blk.", "token_embd", "output"))]
    assert len(table) == 236 and sum(int(r[-1]) for r in table) == per_type
    assert "general.name: 'Gemma 3 270m'" in gemma_inspect and "arch: 'gemma3'" in gemma_inspect


@pytest.mark.oracle
def test_totals_agree_with_llama_cpp(gemma_path, gemma_inspect):
    facts = llama_model.facts(gemma_path)
    total = _sections(gemma_inspect)["tensors"][0]
    assert (int(total[2]), int(total[4])) == (facts["n_params"], facts["size"])


def test_default_model_and_bad_file(capsys, tmp_path):
    assert main(["inspect", "--no-tensors"]) == 0  # the embedded Gemma
    out = capsys.readouterr().out
    assert "gemma-3-270m-q4_k_m.gguf" in out and "blk.0.attn_q.weight" not in out
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    assert main(["inspect", str(bad)]) == 1
    assert f"jaxquant inspect: error: {bad}: " in capsys.readouterr().err


def test_inspect_hf_checkpoint(capsys, tmp_path):
    config = {"model_type": "qwen2", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    save_file({"model.embed_tokens.weight": rng.standard_normal((32, 16)).astype(np.float16),
               "model.norm.weight": np.ones(16, np.float32),
               "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((16, 16)).astype(np.float32)},
              tmp_path / "model.safetensors")
    assert main(["inspect", str(tmp_path)]) == 0
    rows = _sections(capsys.readouterr().out)
    assert rows["F16"][0][1:] == ["1", "512", "16.0000", "1024"]
    assert rows["F32"][0][1:] == ["2", "272", "32.0000", "1088"]
    assert rows["tensors"][0][1:5] == ["3", "784", "21.5510", "2112"]
