"""Orbax checkpoints of quantized models: bit-identical round trip (QTensors, bf16 and numpy arrays),
the model's config and tokenizer kept, loadable by jaxquant.load; a save killed midway leaves the
earlier checkpoint intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
import torch
import transformers

import jaxquant
from jaxquant.errors import FileFormatError, PolicyError
from jaxquant.io import open_model
from jaxquant.io.checkpoint import CheckpointSource, model_record, restore_checkpoint, save_checkpoint
from jaxquant.isq import Policy, Rule
from jaxquant.isq.apply import quantize_model, save_quantized_checkpoint, write_quantized_gguf
from jaxquant.qtensor import QTensor

SMALL = dict(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> str:
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMALL), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.ndim == 2 else 1.0))
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(_TOKENIZER, encoding="utf-8")  # a tiny word-level vocabulary
    return str(path)


_TOKENIZER = ('{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null, '
              '"pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null, "model": '
              '{"type": "WordLevel", "vocab": {"<unk>": 0, "hello": 1, "world": 2}, "unk_token": "<unk>"}}')


def _same(a, b) -> bool:
    if isinstance(a, QTensor):
        return (isinstance(b, QTensor) and (a.fmt, a.shape, a.dtype) == (b.fmt, b.shape, b.dtype)
                and a.arrays.keys() == b.arrays.keys() and all(_same(a.arrays[k], b.arrays[k]) for k in a.arrays))
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def test_round_trip_is_bit_identical(hf_model, tmp_path):
    src = open_model(hf_model)
    policy = Policy(mix="Q4_K_M", rules=[Rule("skip", role="ffn_up"), Rule("Q8_0", role="attn_q")])
    tensors = quantize_model(src, policy, show_progress=False)
    tensors["extra.ids"] = np.arange(10, dtype=np.int32)  # numpy arrays (GGUF integer tensors) stay numpy
    kinds = {type(x).__name__ for x in tensors.values()} | {str(x.dtype) for x in tensors.values()}
    assert {"QTensor", "ArrayImpl", "ndarray", "bfloat16", "float32"} <= kinds
    save_checkpoint(tmp_path / "ckpt", tensors, model_record(src), extra={"note": "x"})
    back, meta = restore_checkpoint(tmp_path / "ckpt")
    assert list(back) == list(tensors) and meta["extra"] == {"note": "x"}
    for name in tensors:
        assert _same(tensors[name], back[name]), name
    assert isinstance(back["extra.ids"], np.ndarray)


def test_quantized_checkpoint_loads_as_a_model(hf_model, tmp_path):
    path = tmp_path / "q"
    save_quantized_checkpoint(open_model(hf_model), "Q4_K_M", path, show_progress=False)
    src = open_model(path)
    assert isinstance(src, CheckpointSource) and src.config == open_model(hf_model).config
    assert src.tokenizer.encode("hello world", add_bos=False) == [1, 2]
    direct = jaxquant.load(hf_model, isq="Q4_K_M")
    restored = jaxquant.load(path)
    for a, b in zip(jax.tree.leaves(direct.params), jax.tree.leaves(restored.params)):
        assert _same(a, b)
    with pytest.raises(FileFormatError, match="not a jaxquant checkpoint directory"):
        save_checkpoint(hf_model, {"x": np.zeros(3, np.float32)})


_SAVER = textwrap.dedent("""
    import sys, numpy as np
    from jaxquant.io.checkpoint import save_checkpoint
    rng = np.random.default_rng(0)
    save_checkpoint(sys.argv[1], {f"t{i}": rng.integers(0, 255, 25_000_000, dtype=np.uint8) for i in range(8)})
    print("DONE", flush=True)
""")


def test_a_killed_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "ckpt"
    first = {"a": np.arange(1000, dtype=np.float32), "b": np.ones((4, 4), np.float16)}
    assert save_checkpoint(path, first) == 0
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    deadline, killed = time.time() + 300, False
    while time.time() < deadline and proc.poll() is None:
        if any("tmp" in p.name for p in path.iterdir()):  # orbax's temporary step directory: mid-save
            time.sleep(0.3)
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    proc.wait()
    assert killed and proc.returncode == -signal.SIGKILL, "the save ended before it could be interrupted"
    back, _ = restore_checkpoint(path)
    assert back.keys() == first.keys() and all(_same(first[k], back[k]) for k in first)
    second = {"c": np.full(7, 3, np.int8)}
    assert save_checkpoint(path, second) == 1  # the next save goes through and replaces the old step
    back, _ = restore_checkpoint(path)
    assert back.keys() == {"c"} and _same(back["c"], second["c"])


def test_cli_writes_an_orbax_checkpoint(hf_model, tmp_path):
    from jaxquant.cli import main as cli

    path = tmp_path / "ck"
    assert cli(["quantize", hf_model, str(path), "--type", "Q8_0", "--no-progress"]) == 0
    src = open_model(path)
    assert isinstance(src, CheckpointSource)
    assert {src.info(n).type for n in src.tensor_names} == {"Q8_0", "BF16"}  # the norms stay as stored
    assert src._meta["extra"] == {"policy": "Q8_0", "ftype": 7}
    with pytest.raises(PolicyError, match="writing GGUF needs a GGUF source"):
        write_quantized_gguf(open_model(hf_model), "Q8_0", tmp_path / "x.gguf")
