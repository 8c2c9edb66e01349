"""Export to Hugging Face GPTQ and AWQ checkpoints (jaxquant.io.hf_export) against the outside world.

Bytes: AutoGPTQ's and AutoAWQ's packing of a layer (``quantized_layers``) loads into a QTensor and
writes back (``to_gptq`` / ``to_awq``) byte for byte; and the written tensors of jaxquant's own
QTensors (act order included) are read by the reference layers (AutoGPTQ's forward, AutoAWQ's
``dequantize_gemm``) as jaxquant's dequantization, bit for bit.

Checkpoints: transformers 5 loads the exported directory with ``AutoModelForCausalLM`` through
gptqmodel (transformers' GPTQ and AWQ backend), on its pure-torch CPU layers (backends
``gptq_torch`` / ``torch_awq``; the default picks torch's int4 ATen kernel, which rounds scales and
activations to bfloat16). Every linear layer's weight (its forward of the identity) equals jaxquant's
dequantization bit for bit, and the logits equal jaxquant's forward of the same quantized model,
relative to the largest: GPTQ within 1e-5 on the tiny models, 1e-4 on SmolLM2 and Gemma-3-270M (slow;
float32 on both sides, only the order of sums differs; measured 6e-7, 7e-6, 1.7e-6); AWQ within 3e-3 and 1e-2
(gptqmodel's AWQ layer casts its input to float16: 2^-11 relative per matrix, 7 matrices a layer;
measured 1.2e-4 and 3.3e-3). The tiny models' float tensors are float16 numbers, so the float16
checkpoint holds them exactly; the real models' exports write float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from quantized_layers import AUTO_GPTQ, AWQ_PACKING, awq_layer, gptq_layer

import jaxquant as jq
from jaxquant import models
from jaxquant.calib import CalibratedSource, Calibration, calibrate
from jaxquant.cli import main
from jaxquant.errors import FormatError, JaxquantError
from jaxquant.formats import gptq
from jaxquant.formats.packing import pack_bits
from jaxquant.io import open_model
from jaxquant.io.hf_export import MATRIX, save_hf
from jaxquant.io.hf_names import hf_name
from jaxquant.io.hf_quantized import QuantizedHFSource
from jaxquant.io.safetensors import _permute
from jaxquant.isq import Policy
from jaxquant.isq.apply import quantized_source, save_quantized_hf
from jaxquant.qtensor import QTensor

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              # gptqmodel calls transformers' deprecated is_gradient_checkpointing while it loads
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              # the loading backend passed to from_pretrained: what it means
              pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")]
DEQUANTIZE = jax.jit(QTensor.dequantize)
SMALL = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
         "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
MODELS = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": True}),
    "gemma3": (transformers.Gemma3TextConfig, {
        "sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"], "query_pre_attn_scalar": 24,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}}),
}
TOKENIZER = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
             "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
             "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "hello": 1, "world": 2}, "unk_token": "<unk>"}}


# ---- bytes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group,act,sym,v2", [(2, 32, True, False, False), (3, 64, False, False, True),
                                                   (4, 32, True, False, True), (4, -1, False, True, False),
                                                   (8, 32, True, False, False)])
def test_gptq_bytes_equal_autogptq(bits, group, act, sym, v2):
    """AutoGPTQ's packing of a layer (act order: its g_idx) reads and writes back byte for byte."""
    tensors, _ = gptq_layer(np.random.default_rng(bits), 64, 128, bits=bits, group=group, act=act, sym=sym, v2=v2)
    q = gptq.from_gptq(*(tensors[k] for k in ("qweight", "qzeros", "scales", "g_idx")), bits=bits, group_size=group,
                       v1=not v2)
    out = gptq.to_gptq(q, v1=not v2)
    assert out.keys() == tensors.keys()
    for key, ref in tensors.items():
        assert out[key].dtype == ref.dtype and out[key].shape == ref.shape and np.array_equal(out[key], ref), key


def test_awq_bytes_equal_autoawq():
    tensors, _ = awq_layer(np.random.default_rng(0), 64, 128, bits=4, group=32)
    out = gptq.to_awq(gptq.from_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], bits=4, group_size=32))
    assert out.keys() == tensors.keys()
    for key, ref in tensors.items():
        assert out[key].dtype == ref.dtype and np.array_equal(out[key], ref), key


def _qtensor(w: np.ndarray, fmt: str, act: bool = False, rng=None) -> QTensor:
    """jaxquant's round-to-nearest of ``w``; act order: its columns in a random order."""
    if not act:
        return jq.quantize(w, fmt)
    perm = rng.permutation(w.shape[1]).astype(np.int32)
    q = jq.quantize(w[:, perm], fmt)
    return QTensor({**q.arrays, "perm": jnp.asarray(perm)}, q.fmt, q.shape)


def _random(rng, n: int, k: int) -> np.ndarray:
    return rng.standard_normal((n, k)).astype(np.float32)


@pytest.mark.parametrize("fmt,act", [("GPTQ2_G32", True), ("GPTQ3_G64", False), ("GPTQ4_G32", True),
                                     ("GPTQ8_G128", True)])
def test_autogptq_reads_written_gptq(fmt, act):
    """AutoGPTQ's layer loaded with ``to_gptq``'s tensors computes jaxquant's dequantization."""
    rng = np.random.default_rng(1)
    q = _qtensor(_random(rng, 64, 128), fmt, act, rng)
    bits, group = gptq.bits_of(q), q.format.block_size
    layer = AUTO_GPTQ.QuantLinear(bits, group, 128, 64, False)
    for key, a in gptq.to_gptq(q, v1=True).items():
        getattr(layer, key).copy_(torch.tensor(a))
    with torch.no_grad():
        ref = layer.half()(torch.eye(128, dtype=torch.float16)).T.float().numpy()
    np.testing.assert_array_equal(np.asarray(DEQUANTIZE(q)).view(np.uint32), ref.view(np.uint32))


def test_autoawq_reads_written_awq():
    q = _qtensor(_random(np.random.default_rng(2), 64, 128), "GPTQ4_G64")
    t = {k: torch.tensor(a) for k, a in gptq.to_awq(q).items()}
    ref = AWQ_PACKING.dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], 4, 64).T.float().numpy()
    np.testing.assert_array_equal(np.asarray(DEQUANTIZE(q)).view(np.uint32), ref.view(np.uint32))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.sampled_from([2, 3, 4, 8]), st.sampled_from([32, 64, 128]), st.integers(1, 3), st.integers(1, 5),
       st.sampled_from(["v1", "v2", "awq"]), st.booleans(), st.integers(0, 2**32 - 1))
def test_round_trip(bits, group, groups, n8, kind, act, seed):
    """Any GPTQ QTensor -> checkpoint tensors -> QTensor is the same QTensor (act order: with each
    group's columns ascending, the order the loaders make; any row count for GPTQ, whose qzeros rows
    end padded to whole words)."""
    rng = np.random.default_rng(seed)
    if kind == "awq":
        bits, act = 4, False
    n, k, maxq = 8 * n8 + (0 if kind == "awq" else int(rng.integers(0, 8))), group * groups, (1 << bits) - 1
    codes = rng.integers(0, maxq + 1, (n, k // group, group))
    arrays = {"qs": pack_bits(codes, bits, np), "scale": rng.standard_normal((n, k // group)).astype(np.float16),
              "zero": rng.integers(kind == "v1", maxq + 1, (n, k // group)).astype(np.uint8)}
    perm = np.sort(rng.permutation(k).reshape(-1, group), axis=1).reshape(-1).astype(np.int32)
    if act and (perm != np.arange(k)).any():  # (an order that keeps every group is none)
        arrays["perm"] = perm
    q = QTensor({key: jnp.asarray(a) for key, a in arrays.items()}, gptq.gptq_format(bits, group).name, (n, k))
    if kind == "awq":
        t = gptq.to_awq(q)
        back = gptq.from_awq(t["qweight"], t["qzeros"], t["scales"], bits=4, group_size=group)
    else:
        t = gptq.to_gptq(q, v1=kind == "v1")
        back = gptq.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=bits, group_size=group,
                              v1=kind == "v1")
    assert back.fmt == q.fmt and back.shape == q.shape and back.arrays.keys() == q.arrays.keys()
    for key in q.arrays:
        np.testing.assert_array_equal(np.asarray(back.arrays[key]), np.asarray(q.arrays[key]), err_msg=key)


def test_v1_zero_point_zero():
    """A zero point of 0 (a group with nothing below zero) has no v1 code: an error for v1, v2 by default."""
    w = _random(np.random.default_rng(3), 32, 64)
    w[5, :32] = np.abs(w[5, :32])
    q = jq.quantize(w, "GPTQ4_G32")
    with pytest.raises(FormatError, match=r"zero point 0 \(group 0, row 5\).*gptq_v2"):
        gptq.to_gptq(q, v1=True)
    out = gptq.to_gptq(q, v1=False)
    back = gptq.from_gptq(out["qweight"], out["qzeros"], out["scales"], out["g_idx"], bits=4, group_size=32, v1=False)
    assert all(np.array_equal(back.arrays[k], q.arrays[k]) for k in q.arrays)


# ---- checkpoints ----------------------------------------------------------------------------------

def _float_model(arch: str, path) -> None:
    """A random HF model whose weights are float16 numbers (larger than HF's init), saved in float32."""
    cls, extra = MODELS[arch]
    model = transformers.AutoModelForCausalLM.from_config(cls(**{**SMALL, **extra})).eval()
    g = torch.Generator().manual_seed(len(arch))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            scale = 1.0 if p.ndim == 1 or "embed" in name else p.shape[1] ** -0.5
            p.copy_((noise * (0.2 if p.ndim == 1 else scale) + (1.0 if "norm" in name and arch != "gemma3" else 0.0))
                    .half().float())
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(json.dumps(TOKENIZER))


def _quantized(src, fmt: str, act: bool, rng) -> CalibratedSource:
    """``src`` with every block matrix a ``fmt`` QTensor (act order: random column orders), as
    ``calibrate`` returns a model."""
    return CalibratedSource(src, {n: _qtensor(np.asarray(src.load(n)), fmt, act, rng)
                                  for n in src.tensor_names if MATRIX.match(n)})


def _logits(params, cfg, ids: np.ndarray) -> np.ndarray:
    logits, _ = models.forward(params, jnp.asarray(ids)[None], jnp.arange(len(ids))[None],
                               models.init_cache(cfg, 1, len(ids)), cfg)
    return np.asarray(logits[0])


def _hf_weight(layer: torch.nn.Module) -> np.ndarray:
    """A loaded linear layer's weight [N, K]: its forward of the identity, without its bias."""
    bias, layer.bias = layer.bias, None
    try:
        with torch.no_grad():
            return layer(torch.eye(layer.in_features)).T.numpy()
    finally:
        layer.bias = bias


CASES = {  # arch, method, format, act order, a zero point of 0 (-> gptq_v2)
    "llama-gptq4-act": ("llama", "gptq", "GPTQ4_G32", True, False),
    "qwen2-gptq8-v2": ("qwen2", "gptq", "GPTQ8_G64", False, True),
    "gemma3-awq": ("gemma3", "awq", "GPTQ4_G32", False, False),
}


@pytest.fixture
def eager_torch():
    """gptqmodel's torch layers torch.compile their dequantization (with inductor: ~15 s of C++ on
    CPU); eager torch runs the same operations."""
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_export(tmp_path, case, eager_torch):
    """transformers (gptqmodel) loads the export: each layer's weight is jaxquant's bit for bit and
    the logits are jaxquant's; jaxquant reads it back as the same model."""
    arch, method, fmt, act, zero = CASES[case]
    _float_model(arch, tmp_path / "f")
    src = open_model(tmp_path / "f")
    rng = np.random.default_rng(0)
    model = _quantized(src, fmt, act, rng)
    if zero:  # one group with nothing below zero
        w = np.asarray(src.load("blk.1.ffn_up.weight")).copy()
        w[3, :64] = np.abs(w[3, :64])
        model.tensors["blk.1.ffn_up.weight"] = jq.quantize(w, fmt)
    config = save_hf(model, tmp_path / "q", method)
    qc = config["quantization_config"]
    if method == "gptq":
        assert (qc["checkpoint_format"], qc["desc_act"], qc["sym"]) == ("gptq_v2" if zero else "gptq", act, False)
    assert (tmp_path / "q" / "tokenizer.json").read_text() == json.dumps(TOKENIZER)

    backend = transformers.GPTQConfig(bits=4, backend="gptq_torch") if method == "gptq" else \
        transformers.AwqConfig(bits=4, backend="torch_awq")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32,
                                                           quantization_config=backend).eval()
    cfg = src.config
    modules = dict(hf.named_modules())
    for name, q in model.tensors.items():
        want = np.asarray(DEQUANTIZE(q))
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):  # back to HF's rope row order
            want = _permute(want, cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads, inverse=True)
        got = _hf_weight(modules[hf_name(arch, name).removesuffix(".weight")])
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=name)

    ids = np.random.default_rng(1).integers(0, SMALL["vocab_size"], 12)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)[None]).logits[0].numpy()
    ours = _logits(models.load_params(model, cfg), cfg, ids)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"{case}: logits within {rel:.2e} of the largest")
    assert rel < (1e-5 if method == "gptq" else 3e-3)

    back = open_model(tmp_path / "q")
    assert isinstance(back, QuantizedHFSource) and back.config == cfg
    for name in src.tensor_names:
        got, want = back.load(name), model.load(name)
        if isinstance(want, QTensor) and "perm" not in want.arrays:
            assert got.fmt == want.fmt and all(np.array_equal(got.arrays[k], want.arrays[k]) for k in want.arrays)
        else:
            got, want = (np.asarray(DEQUANTIZE(x) if isinstance(x, QTensor) else x) for x in (got, want))
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_export_errors(tmp_path):
    """What a GPTQ/AWQ checkpoint cannot hold fails before anything is written, naming the tensor."""
    _float_model("llama", tmp_path / "f")
    src = open_model(tmp_path / "f")
    model = _quantized(src, "GPTQ4_G32", False, None)
    w = np.asarray(src.load("blk.0.ffn_down.weight"))
    positive = np.abs(w)
    cases = [
        ({"blk.0.ffn_down.weight": jq.quantize(w, "Q4_0")}, {},
         r"'blk.0.ffn_down.weight' is Q4_0; a GPTQ checkpoint needs every block matrix in a GPTQ\{b\}_G\{g\}"),
        ({"blk.0.ffn_down.weight": None}, {}, r"'blk.0.ffn_down.weight' is float"),
        ({"blk.0.ffn_down.weight": jq.quantize(w, "GPTQ8_G32")}, {},
         r"'blk.0.ffn_down.weight' has 8 bits in groups of 32, .* a GPTQ checkpoint holds one bit width"),
        ({"blk.1.ffn_up.weight": _qtensor(np.asarray(src.load("blk.1.ffn_up.weight")), "GPTQ4_G32", True,
                                          np.random.default_rng(0))},
         {"method": "awq"}, r"blk.1.ffn_up.weight: AWQ GEMM packs 4-bit codes in input order"),
        ({"blk.0.ffn_down.weight": jq.quantize(positive, "GPTQ4_G32")}, {"checkpoint_format": "gptq"},
         r"blk.0.ffn_down.weight: zero point 0 \(group 0, row 0\) cannot be stored in GPTQ v1"),
    ]
    for change, kw, match in cases:
        tensors = {k: v for k, v in {**model.tensors, **change}.items() if v is not None}
        with pytest.raises(FormatError, match=match):
            save_hf(CalibratedSource(src, tensors), tmp_path / "q", **kw)
        assert not (tmp_path / "q").exists()
    transformers.AutoModelForCausalLM.from_config(transformers.Phi3Config(**SMALL)).save_pretrained(tmp_path / "phi3")
    with pytest.raises(JaxquantError, match="writing a phi3 config.json is not supported"):
        save_hf(open_model(tmp_path / "phi3"), tmp_path / "q")
    with pytest.raises(JaxquantError, match="save_hf: method 'exl2'"):
        save_hf(model, tmp_path / "q", "exl2")
    (tmp_path / "file").write_text("")
    with pytest.raises(JaxquantError, match="exists and is a file"):
        save_hf(model, tmp_path / "file")
    (tmp_path / "f" / "tokenizer.json").unlink()
    logged = []
    save_hf(model, tmp_path / "q", log=logged.append)
    want = f"{tmp_path / 'q'}: no tokenizer written ({tmp_path / 'f'} holds no tokenizer files); copy the original"
    assert logged == [want + " model's tokenizer files there"]


def test_cli_quantize_hf(tmp_path):
    """``jaxquant quantize --hf awq`` by a policy of GPTQ formats: an AWQ checkpoint with the tokenizer."""
    _float_model("qwen2", tmp_path / "f")
    (tmp_path / "policy.yaml").write_text("default: GPTQ4_G32\nembeddings: F16\n")
    args = ["quantize", str(tmp_path / "f"), str(tmp_path / "q"), "--policy", str(tmp_path / "policy.yaml"),
            "--hf", "awq", "--no-progress"]
    assert main(args) == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                             "version": "gemm"}
    back = open_model(tmp_path / "q")
    assert back.info("blk.1.attn_k.weight").type == "GPTQ4_G32" and back.info("token_embd.weight").type == "F16"
    assert (tmp_path / "q" / "tokenizer.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_smollm2_export(tmp_path, smollm2_path, method, eager_torch):
    """SmolLM2-135M-Instruct (llama, Q4_1 GGUF) calibrated into GPTQ4_G64 (its 576 inputs are not
    whole groups of 128) by GPTQ with act order, or by AWQ (first 4 layers; the others rounded),
    exported with float32 floats: transformers' tokenizer (converted from the GGUF) gives llama.cpp's
    token ids, and its logits are jaxquant's."""
    src = open_model(smollm2_path)
    text = (Path(__file__).parents[1] / "data" / "shakespeare.txt").read_text(encoding="utf-8")
    policy = Policy(default="GPTQ4_G64", embeddings="F16")
    calib = Calibration(method, n_ctx=128, n_chunks=4, act_order=method == "gptq",
                        layers=None if method == "gptq" else "first 4")
    model = calibrate(src, policy, text, calib, show_progress=False)
    save_quantized_hf(model, policy, tmp_path / "q", method, show_progress=False, dtype="float32")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["group_size"] == 64
    assert config["quantization_config"].get("desc_act", False) == (method == "gptq")

    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = src.tokenizer.encode(chat + text[:2000], add_bos=None, parse_special=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "q")
    assert tokenizer(chat + text[:2000])["input_ids"] == ids

    backend = transformers.GPTQConfig(bits=4, backend="gptq_torch") if method == "gptq" else \
        transformers.AwqConfig(bits=4, backend="torch_awq")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32,
                                                           quantization_config=backend).eval()
    ids = np.asarray(ids[:64])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)[None]).logits[0].numpy()
    ours = _logits(models.load_params(quantized_source(model, policy), src.config), src.config, ids)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    print(f"SmolLM2 {method}: logits within {rel:.2e} of the largest, argmax agrees at {agree:.0%} of positions")
    assert rel < (1e-4 if method == "gptq" else 1e-2) and agree > 0.95


@pytest.mark.slow
def test_gemma_export(tmp_path, gemma_path, eager_torch):
    """The embedded Gemma-3-270M (Q4_K_M GGUF; norms as 1 + w) rounded to GPTQ4_G128 by a policy and
    exported with float32 floats: transformers' converted SentencePiece tokenizer gives llama.cpp's
    ids, and its logits are jaxquant's."""
    src = open_model(gemma_path)
    policy = Policy(default="GPTQ4_G128", embeddings="F16")
    save_quantized_hf(src, policy, tmp_path / "q", "gptq", show_progress=False, dtype="float32")
    text = "The capital of France is Paris. The capital of Germany is"
    ids = src.tokenizer.encode(text, add_bos=None)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "q")(text)["input_ids"] == ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "q", dtype=torch.float32, quantization_config=transformers.GPTQConfig(bits=4, backend="gptq_torch"))
    with torch.no_grad():
        ref = hf.eval()(torch.tensor(ids)[None]).logits[0].numpy()
    ours = _logits(models.load_params(quantized_source(src, policy), src.config), src.config, np.asarray(ids))
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"Gemma-3-270M GPTQ4_G128: logits within {rel:.2e} of the largest")
    assert rel < 1e-4 and (ours.argmax(-1) == ref.argmax(-1)).all()
