"""Importance matrices: the file format against llama.cpp's own GGUF writer (byte for byte, reading
its files, empty dataset lists, expert matrices, the legacy .dat format), llama-quantize's
normalization, and the collected statistics against transformers (small model) and llama.cpp's
activations on the real model (10 chunks of 512 tokens)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import transformers

import jaxquant
import llama_imatrix
from jaxquant.cli import main as cli
from jaxquant.errors import FileFormatError
from jaxquant.eval.synthetic import english_text
from jaxquant.isq.imatrix import Imatrix, collect_imatrix, read_imatrix, write_imatrix

SUMS = {"blk.0.attn_q.weight": np.arange(8, dtype=np.float32) * 3.5,
        "blk.1.ffn_down.weight": np.linspace(0.5, 9, 16, dtype=np.float32)}
COUNTS = {"blk.0.attn_q.weight": 7, "blk.1.ffn_down.weight": 0}


@pytest.mark.oracle
@pytest.mark.parametrize("datasets", [[], ["calibration.txt"], ["a.txt", "b.txt"]])
def test_files_read_and_write_as_llama_cpp(datasets, tmp_path):
    theirs, ours = str(tmp_path / "theirs.gguf"), str(tmp_path / "ours.gguf")
    llama_imatrix.save(theirs, SUMS, COUNTS, 3, 512, datasets)
    im = read_imatrix(theirs)
    assert (im.datasets, im.chunk_count, im.chunk_size, im.entries) == (datasets, 3, 512, sorted(SUMS))
    for name in SUMS:
        assert np.array_equal(im.sums[name], SUMS[name][None]) and im.counts[name].tolist() == [COUNTS[name]]
    write_imatrix(im, ours)
    assert open(ours, "rb").read() == open(theirs, "rb").read()


def test_weights_are_llama_quantizes():
    """load_imatrix in tools/quantize: sums / lround(count) per matrix, 1 where nothing was counted."""
    im = Imatrix({"e": np.array([[2, 4], [6, 8], [1, 1]], np.float32)}, {"e": np.array([2.5, 4, 0], np.float32)})
    want = np.array([np.float32(2) / np.float32(3), np.float32(4) / np.float32(3), 1.5, 2, 1, 1], np.float32)
    assert np.array_equal(im.weights()["e"], want)  # 2.5 rounds to 3 (away from 0); float32 division


def test_expert_matrices_round_trip(tmp_path):
    im = Imatrix({"blk.0.ffn_up_exps.weight": np.arange(12, dtype=np.float32).reshape(3, 4)},
                 {"blk.0.ffn_up_exps.weight": np.array([1, 2, 3], np.float32)}, ["t"], 1, 512)
    write_imatrix(im, tmp_path / "e.gguf")
    back = read_imatrix(tmp_path / "e.gguf")
    assert np.array_equal(back.sums["blk.0.ffn_up_exps.weight"], im.sums["blk.0.ffn_up_exps.weight"])
    assert back.counts["blk.0.ffn_up_exps.weight"].tolist() == [1, 2, 3]


def test_legacy_dat_files(tmp_path):
    """save_imatrix_legacy's layout: sums stored as (sum / count) * ncall, read back as llama-quantize does."""
    path = tmp_path / "old.dat"
    blob = struct.pack("<i", 2)
    for name, values, ncall in (("blk.0.attn_q.weight", [1.0, 2.0, 3.0], 4), ("blk.0.attn_k.weight", [5.0], 0)):
        blob += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(values))
        blob += struct.pack(f"<{len(values)}f", *values)
    blob += struct.pack("<i", 10) + struct.pack("<i", 8) + b"wiki.txt"
    path.write_bytes(blob)
    im = read_imatrix(path)
    assert im.legacy and im.chunk_count == 10 and im.datasets == ["wiki.txt"]
    w = im.weights()
    assert w["blk.0.attn_q.weight"].tolist() == [0.25, 0.5, 0.75] and w["blk.0.attn_k.weight"].tolist() == [5.0]
    path.write_bytes(blob[:30])
    with pytest.raises(FileFormatError, match="truncated legacy imatrix"):
        read_imatrix(path)


# ---- collecting ---------------------------------------------------------------------------------

VOCAB = ["<unk>", "<s>"] + [f"w{i}" for i in range(62)]
_TOKENIZER = ('{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null, '
              '"pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null, "model": '
              '{"type": "WordLevel", "vocab": {' + ", ".join(f'"{w}": {i}' for i, w in enumerate(VOCAB)) +
              '}, "unk_token": "<unk>"}}')


def test_collected_sums_equal_transformers_inputs(tmp_path):
    """A small random Llama: per block matrix, the sum over all chunk tokens of each input column
    squared, against the inputs transformers' Linear layers see (forward hooks)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim == 2 else 1.0))
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text(_TOKENIZER, encoding="utf-8")
    rng = np.random.default_rng(0)
    text = " ".join(f"w{i}" for i in rng.integers(0, 62, 100))  # 100 tokens: 6 chunks of 16
    im = collect_imatrix(jaxquant.load(tmp_path / "m"), text, n_ctx=16, batch=4, show_progress=False)
    assert im.chunk_count == 6 and im.chunk_size == 16

    ref: dict[str, np.ndarray] = {}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for mod_name, mod in [*layer.self_attn.named_children(), *layer.mlp.named_children()]:
            if mod_name in names:
                key = f"blk.{i}.{names[mod_name]}.weight"
                hooks.append(mod.register_forward_hook(
                    lambda _m, args, _out, key=key: ref.__setitem__(
                        key, ref.get(key, 0) + (args[0].double() ** 2).sum((0, 1)).numpy())))
    ids = [VOCAB.index(w) for w in text.split()]
    with torch.no_grad():
        for c in range(6):
            model(torch.tensor([ids[16 * c:16 * (c + 1)]]))
    assert sorted(ref) == im.entries
    for name in im.entries:
        assert im.counts[name].tolist() == [96]
        np.testing.assert_allclose(im.sums[name][0], ref[name], rtol=1e-5, err_msg=name)


@pytest.mark.oracle
@pytest.mark.slow
def test_gemma_imatrix_equals_llama_cpps_statistic(float_gemma, tmp_path):
    """`jaxquant imatrix` on 10 chunks of 512 tokens of the float Gemma against the same statistic
    from llama.cpp's activations (its cb_eval, f32 KV cache, no flash attention): identical token
    counts; every matrix within 1e-4 relative (norm of the difference over norm); elementwise within
    1e-4 for the inputs of layer 0's q/k/v. Later layers differ elementwise up to ~1e-3 on small
    columns because llama.cpp's CPU GELU is an f16 lookup table (GGML_GELU_FP16), which moves the
    activations of every layer after the first FFN by f16 rounding."""
    text_path = tmp_path / "text.txt"
    text_path.write_text(english_text(4500), encoding="utf-8")
    out = tmp_path / "ours.gguf"
    assert cli(["imatrix", float_gemma, "--file", str(text_path), "-o", str(out), "--chunks", "10"]) == 0
    ours = read_imatrix(out)
    assert (ours.chunk_count, ours.chunk_size, ours.datasets) == (10, 512, [str(text_path)])
    sums, counts, n = llama_imatrix.collect(float_gemma, text_path.read_text(encoding="utf-8"), 512, 10, f32=True)
    assert n == 10 and sorted(sums) == ours.entries and len(sums) == 18 * 7
    worst = 0.0
    for name in ours.entries:
        assert ours.counts[name].tolist() == [counts[name]] == [5120]
        a, b = ours.sums[name][0].astype(np.float64), sums[name].astype(np.float64)
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        worst = max(worst, rel)
        assert rel < 1e-4, (name, rel)
        if name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
            np.testing.assert_allclose(a, b, rtol=1e-4, err_msg=name)
    print(f"\nworst per-matrix relative difference {worst:.2e}")
