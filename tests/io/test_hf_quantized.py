"""Pre-quantized HF checkpoints (GPTQ, AWQ, MLX) against the reference libraries.

Checkpoints are packed here by the libraries' own code: AutoGPTQ's ``QuantLinear.pack``
(qlinear_cuda, the act-order-aware layer; it writes v1 zeros) and AutoAWQ's
``WQLinear_GEMM.from_linear``. Both packages' ``__init__`` import APIs that transformers 5 no longer
has, so only their pure-torch layer modules are imported (``quantized_layers``). The
references' dequantized weights are AutoGPTQ's torch forward of the identity matrix (its CPU path:
``scales[g_idx] * (w - zeros[g_idx])`` in fp16) and AutoAWQ's ``dequantize_gemm``. GPTQ v2 zeros (no minus one) are
AutoGPTQ's packing of zero + 1, which its pack stores as zero (GPTQModel's v1 -> v2 conversion adds
one to each packed zero). MLX checkpoints hold ``mx.quantize``'s tensors under mlx-lm's names and
config; the reference is ``mx.dequantize``. bitsandbytes checkpoints are written by transformers'
bitsandbytes integration on CPU; the reference is bitsandbytes' dequantization.

Each loader's exactness (every weight bit for bit) is in the fast suite; whole-model logits vs
transformers are slow tests (one model forward each), sharing the checkpoints through fixtures.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from quantized_layers import awq_layer, gptq_layer
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch

import jaxquant
from jaxquant import Policy, models
from jaxquant.cli import main
from jaxquant.errors import FileFormatError
from jaxquant.io import open_model
from jaxquant.io.hf_quantized import QuantizedHFSource
from jaxquant.io.safetensors import _permute
from jaxquant.qtensor import QTensor

# transformers' lazy import of cache_utils pulls in hqq (when installed), whose torch.compile warns
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
CONFIG = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
CANONICAL = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
TOKENIZER = ('{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null, '
             '"pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null, "model": '
             '{"type": "WordLevel", "vocab": {"<unk>": 0, "hello": 1, "world": 2}, "unk_token": "<unk>"}}')


DEQUANTIZE = jax.jit(QTensor.dequantize)


def mlx_layer(w: np.ndarray, bits: int, group: int):
    """mx.quantize's tensors of a float16 weight and mx.dequantize's weight [N, K] (float32)."""
    wq, scales, biases = mx.quantize(mx.array(w.astype(np.float16)), group_size=group, bits=bits)
    ref = np.array(mx.dequantize(wq, scales, biases, group_size=group, bits=bits)).astype(np.float32)
    return {"weight": np.array(wq), "scales": np.array(scales), "biases": np.array(biases)}, ref


def build_mlx(path, quantization: dict, seed: int = 0):
    """A random Llama saved as mlx-lm saves a quantized model (embeddings and lm_head included),
    with ``quantization`` as its config's; returns what ``build`` returns."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**CONFIG, "num_hidden_layers": 2})
    model = transformers.LlamaForCausalLM(config).eval()
    modules = {"model.embed_tokens": (model.model.embed_tokens, "token_embd.weight"),
               "lm_head": (model.lm_head, "output.weight")}
    for i, layer in enumerate(model.model.layers):
        modules.update({f"model.layers.{i}.{part}.{name}": (getattr(getattr(layer, part), name),
                                                            f"blk.{i}.{CANONICAL[name]}.weight")
                        for part, names in LINEARS.items() for name in names})
    tensors, refs = {}, {}
    for prefix, (module, canonical) in modules.items():
        settings = quantization.get(prefix, quantization)
        if settings is False:
            continue
        packed, ref = mlx_layer(module.weight.detach().numpy(), settings["bits"], settings["group_size"])
        module.weight.data = torch.tensor(ref)
        tensors.update({f"{prefix}.{k}": v for k, v in packed.items()})
        refs[canonical] = ref
    tensors.update({k: v.detach().numpy().copy() for k, v in model.state_dict().items()
                    if f"{k.rpartition('.')[0]}.scales" not in tensors})
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**config.to_dict(), "quantization": quantization,
                                                  "quantization_config": quantization}))
    (path / "tokenizer.json").write_text(TOKENIZER)
    return path, model, refs


def build(path, method: str, seed: int = 0, **kw):
    """A random Llama checkpoint whose linear layers are quantized by ``method`` ('gptq' | 'awq').
    Returns the path, the transformers model carrying the reference-dequantized weights, and
    {canonical name: reference weight}."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = transformers.LlamaConfig(**{**CONFIG, **kw.pop("config", {})})
    model = transformers.LlamaForCausalLM(config).eval()
    tensors, refs = {}, {}
    for i, layer in enumerate(model.model.layers):
        for part, names in LINEARS.items():
            for name in names:
                lin = getattr(getattr(layer, part), name)
                make = gptq_layer if method == "gptq" else awq_layer
                packed, ref = make(rng, lin.out_features, lin.in_features, **kw)
                lin.weight.data = torch.tensor(ref)
                prefix = f"model.layers.{i}.{part}.{name}"
                tensors.update({f"{prefix}.{k}": v for k, v in packed.items()})
                refs[f"blk.{i}.{CANONICAL[name]}.weight"] = ref
    linear = {f"model.layers.{i}.{p}.{n}.weight" for i in range(config.num_hidden_layers)
              for p, ns in LINEARS.items() for n in ns}
    tensors.update({k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k not in linear})
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    qc = {"quant_method": method, "bits": kw["bits"], "group_size": kw["group"]}
    if method == "gptq":
        qc.update(desc_act=kw["act"], sym=kw["sym"], checkpoint_format="gptq_v2" if kw["v2"] else "gptq")
    else:
        qc.update(version="gemm", zero_point=True)
    (path / "config.json").write_text(json.dumps({**config.to_dict(), "quantization_config": qc}))
    (path / "tokenizer.json").write_text(TOKENIZER)
    return path, model, refs


def _reference(name: str, ref: np.ndarray, cfg) -> np.ndarray:
    """The reference weight as jaxquant names it: Llama's q/k rows in llama.cpp's rope order."""
    if ".attn_q." in name:
        return _permute(ref, cfg.n_heads)
    if ".attn_k." in name:
        return _permute(ref, cfg.n_kv_heads)
    return ref


SLOW = pytest.mark.slow
GPTQ_CASES = [  # bits, group, act-order, sym, v2: each bit width, both orders, both zero formats in the fast suite
    (2, 32, False, False, False), pytest.param(2, 32, True, True, True, marks=SLOW), (3, 32, True, False, False),
    pytest.param(3, 64, False, True, True, marks=SLOW), pytest.param(4, 32, True, False, False, marks=SLOW),
    (4, 64, True, False, True), (4, -1, True, False, False), (8, -1, False, True, True)]


@pytest.mark.parametrize("bits,group,act,sym,v2", GPTQ_CASES)
def test_gptq_dequantize_equals_autogptq(tmp_path, bits, group, act, sym, v2):
    path, _, refs = build(tmp_path / "m", "gptq", seed=bits, bits=bits, group=group, act=act, sym=sym, v2=v2)
    src = open_model(path)
    assert isinstance(src, QuantizedHFSource)
    for name, ref in refs.items():
        q = src.load(name)
        k = q.shape[1]
        assert isinstance(q, QTensor) and q.fmt == f"GPTQ{bits}_G{k if group == -1 else group}"
        assert ("perm" in q.arrays) == (act and 0 < group < k)
        assert src.info(name).shape == q.shape and src.info(name).nbytes == q.nbytes
        out = np.asarray(DEQUANTIZE(q))
        np.testing.assert_array_equal(out.view(np.uint32), _reference(name, ref, src.config).view(np.uint32))


@pytest.mark.parametrize("group", [32, 64])
def test_awq_dequantize_equals_autoawq(tmp_path, group):
    path, _, refs = build(tmp_path / "m", "awq", seed=group, bits=4, group=group)
    src = open_model(path)
    for name, ref in refs.items():
        q = src.load(name)
        assert q.fmt == f"GPTQ4_G{group}" and "perm" not in q.arrays
        out = np.asarray(DEQUANTIZE(q))
        np.testing.assert_array_equal(out.view(np.uint32), _reference(name, ref, src.config).view(np.uint32))


def _logits(model: jaxquant.Model, ids: np.ndarray) -> np.ndarray:
    tokens = jnp.asarray(ids)[None]
    positions = jnp.arange(len(ids))[None]
    logits, _ = models.forward(model.params, tokens, positions, models.init_cache(model.cfg, 1, len(ids)), model.cfg)
    return np.asarray(logits[0])


def _check_logits(path, model: torch.nn.Module) -> jaxquant.Model:
    """jaxquant.load of the checkpoint runs, and its logits equal transformers' on the
    reference-dequantized weights; returns the loaded model."""
    ids = np.random.default_rng(1).integers(0, CONFIG["vocab_size"], 12)
    with torch.no_grad():
        want = model(torch.tensor(ids)[None]).logits[0].numpy()
    m = jaxquant.load(path)
    got = _logits(m, ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    return m


@pytest.mark.slow
@pytest.mark.parametrize("method,kw", [("gptq", {"bits": 4, "group": 32, "act": True, "sym": False, "v2": False}),
                                       ("awq", {"bits": 4, "group": 32})])
def test_model_logits_equal_transformers(tmp_path, method, kw):
    """jaxquant.load of the quantized checkpoint runs, and its logits equal transformers' on the
    reference-dequantized weights."""
    path, model, _ = build(tmp_path / "m", method, config={"num_hidden_layers": 2}, **kw)
    assert isinstance(_check_logits(path, model).params.layers[1].ffn_down, QTensor)


def test_inspect_and_requantize(tmp_path, capsys):
    """``jaxquant inspect`` lists the packed layers; ISQ requantizes them from their exact dequantization."""
    path, _, refs = build(tmp_path / "m", "gptq", bits=4, group=-1, act=False, sym=True, v2=True)
    assert main(["inspect", str(path)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("blk.")}
    assert rows["blk.0.ffn_down.weight"][-3:] == ["GPTQ4_G128", f"{8 * (64 * 64 + 64 * 3) / (64 * 128):.4f}",
                                                  str(64 * 64 + 64 * 3)]
    m = jaxquant.load(path, isq=Policy(default="Q8_0"))
    for name, ref in refs.items():
        got = getattr(m.params.layers[0], name.split(".")[2])
        want = jaxquant.quantize(_reference(name, ref, m.cfg), "Q8_0")
        assert got.fmt == "Q8_0" and all(np.array_equal(got.arrays[k], want.arrays[k]) for k in want.arrays)


MLX_QUANTIZATION = {"group_size": 64, "bits": 4, "mode": "affine",
                    "model.layers.0.mlp.down_proj": {"group_size": 128, "bits": 8},
                    "model.layers.0.self_attn.o_proj": {"group_size": 32, "bits": 3},
                    "model.layers.1.mlp.up_proj": {"group_size": 64, "bits": 6},
                    "model.layers.1.mlp.gate_proj": {"group_size": 32, "bits": 5},
                    "model.layers.1.self_attn.k_proj": {"group_size": 32, "bits": 2},
                    "lm_head": False}


@pytest.fixture(scope="module")
def mlx_checkpoint(tmp_path_factory):
    return build_mlx(tmp_path_factory.mktemp("mlx") / "m", MLX_QUANTIZATION)


def test_mlx_dequantize_equals_mlx(mlx_checkpoint):
    """mlx-lm's layout with per-layer overrides: every layer (embeddings too) dequantizes to
    mx.dequantize's weights."""
    path, _, refs = mlx_checkpoint
    src = open_model(path)
    assert src.info("blk.0.ffn_down.weight").type == "AFQ8_G128" and src.info("output.weight").type == "F32"
    for name, ref in refs.items():
        q = src.load(name)
        assert src.info(name).nbytes == q.nbytes
        np.testing.assert_array_equal(np.asarray(DEQUANTIZE(q)).view(np.uint32),
                                      _reference(name, ref, src.config).view(np.uint32))


@pytest.mark.slow
def test_mlx_logits(mlx_checkpoint):
    path, model, _ = mlx_checkpoint
    assert _check_logits(path, model).params.token_embd.fmt == "AFQ4_G64"


def build_fp8(path, blocks: bool):
    """transformers' fine-grained FP8 layout (float8 weights, weight_scale_inv per 128x128 block or per
    tensor; lm_head left in float); returns what ``build`` returns, the references being
    transformers' ``_dequantize_fp8_weight``."""
    from transformers.integrations import finegrained_fp8  # here: it imports hqq, which warns (pytestmark)

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**CONFIG, "hidden_size": 128, "intermediate_size": 256})
    model = transformers.LlamaForCausalLM(config).eval()
    block = [128, 128] if blocks else None
    tensors, refs = {}, {}
    for i, layer in enumerate(model.model.layers):
        for part, names in LINEARS.items():
            for name in names:
                lin = getattr(getattr(layer, part), name)
                n, k = lin.weight.shape
                q = (torch.randn(n, k) * 100).to(torch.float8_e4m3fn)
                scale = torch.rand((-(-n // 128), k // 128) if blocks else ()) * 1e-3
                ref = finegrained_fp8._dequantize_fp8_weight(q, scale, block, torch.float32)
                lin.weight.data = ref
                prefix = f"model.layers.{i}.{part}.{name}"
                tensors.update({f"{prefix}.weight": q, f"{prefix}.weight_scale_inv": scale})
                refs[f"blk.{i}.{CANONICAL[name]}.weight"] = ref.numpy()
    tensors.update({k: v.detach().clone() for k, v in model.state_dict().items() if f"{k}_scale_inv" not in tensors})
    path.mkdir()
    save_torch(tensors, str(path / "model.safetensors"))
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": block,
          "modules_to_not_convert": ["lm_head"]}
    (path / "config.json").write_text(json.dumps({**config.to_dict(), "quantization_config": qc}))
    (path / "tokenizer.json").write_text(TOKENIZER)
    return path, model, refs


@pytest.mark.parametrize("blocks", [True, False])
def test_fp8_dequantize_equals_transformers(tmp_path, blocks):
    path, _, refs = build_fp8(tmp_path / "m", blocks)
    src = open_model(path)
    for name, ref in refs.items():
        q = src.load(name)
        assert q.fmt == ("FP8_E4M3_B128" if blocks else "FP8_E4M3") and src.info(name).nbytes == q.nbytes
        np.testing.assert_array_equal(np.asarray(DEQUANTIZE(q)).view(np.uint32),
                                      _reference(name, ref, src.config).view(np.uint32))


@pytest.mark.slow
def test_fp8_logits(tmp_path):
    """128x128 blocks (per-tensor scales differ only in the dequantization checked above)."""
    path, model, _ = build_fp8(tmp_path / "m", blocks=True)
    _check_logits(path, model)


def test_bad_checkpoints(tmp_path):
    """Unsupported methods and layouts, and a g_idx that does not make whole groups, are errors that say so."""
    path, _, _ = build(tmp_path / "m", "gptq", bits=4, group=32, act=True, sym=False, v2=False)
    config = json.loads((path / "config.json").read_text())
    for qc, message in (({"quant_method": "awq", "version": "gemv"}, "AWQ version 'gemv'"),
                        ({"quant_method": "bitnet"}, "quantization method 'bitnet'"),
                        ({**config["quantization_config"], "checkpoint_format": "marlin"}, "checkpoint_format"),
                        ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "weight_block_size [64, 64]"),
                        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                          "bnb_4bit_quant_storage": "bfloat16"}, "quant storage 'bfloat16'")):
        (path / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
        with pytest.raises(FileFormatError, match=re.escape(message)):
            open_model(path)
    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(path / "model.safetensors"))
    g_idx = tensors["model.layers.0.mlp.up_proj.g_idx"]
    g_idx[0] = (g_idx[0] + 1) % 2  # one column moves to the other group: 31 and 33 columns
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(FileFormatError, match="g_idx does not put exactly 32 input features in each"):
        open_model(path).load("blk.0.ffn_up.weight")


BNB_CASES = {  # name: (BitsAndBytesConfig kwargs, config overrides, format of the unpermuted layers)
    "nf4": ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, {}, "NF4"),
    # hidden 256 in 2 heads: q/k heads of 128 rows cross the nested blocks (64 rows of 4 absmax)
    "nf4_dq": ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
               {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1}, "NF4_DQ"),
    "fp4_dq": ({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
               {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1}, "FP4_DQ"),
    "int8": ({"load_in_8bit": True}, {}, "INT8"),
}


def build_bnb(path, case: str, seed: int = 0):
    """A random Llama quantized by transformers' bitsandbytes integration (on CPU) and saved as it
    saves one; returns the path, the float model carrying bitsandbytes' dequantized weights and
    {canonical name: those weights}."""
    import bitsandbytes.functional as bnbf

    torch.manual_seed(seed)
    kwargs, overrides, _ = BNB_CASES[case]
    config = transformers.LlamaConfig(**{**CONFIG, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path / "float")
    quantized = transformers.LlamaForCausalLM.from_pretrained(
        path / "float", quantization_config=transformers.BitsAndBytesConfig(**kwargs), device_map="cpu",
        dtype=torch.float32)
    quantized.save_pretrained(path / "m")
    (path / "m" / "tokenizer.json").write_text(TOKENIZER)
    refs = {}
    for i, (layer, qlayer) in enumerate(zip(model.model.layers, quantized.model.layers, strict=True)):
        for part, names in LINEARS.items():
            for name in names:
                w = getattr(getattr(qlayer, part), name).weight
                if "load_in_8bit" in kwargs:
                    ref = bnbf.int8_vectorwise_dequant(w.data, w.SCB)
                else:
                    ref = bnbf.dequantize_4bit(w.data, w.quant_state)
                getattr(getattr(layer, part), name).weight.data = ref.float()
                refs[f"blk.{i}.{CANONICAL[name]}.weight"] = ref.float().numpy()
    return path / "m", model, refs


@pytest.fixture(scope="module", params=list(BNB_CASES))
def bnb_checkpoint(request, tmp_path_factory):
    return request.param, *build_bnb(tmp_path_factory.mktemp(request.param), request.param)


def test_bnb_dequantize_equals_bitsandbytes(bnb_checkpoint):
    """transformers' bitsandbytes checkpoints (4-bit NF4/FP4 with and without double quantization,
    LLM.int8) load straight into the bnb formats: weights equal bitsandbytes' dequantization bit for
    bit (Llama's q/k, reordered, lose only the nested absmax quantization)."""
    case, path, _, refs = bnb_checkpoint
    src = open_model(path)
    fmt = BNB_CASES[case][2]
    for name, ref in refs.items():
        q = src.load(name)
        permuted = ".attn_q." in name or ".attn_k." in name
        assert q.fmt == (fmt.removesuffix("_DQ") if permuted else fmt), (name, q.fmt)
        assert src.info(name).shape == q.shape and src.info(name).nbytes == q.nbytes
        ours, want = np.asarray(DEQUANTIZE(q)), _reference(name, ref, src.config)
        # zeros by value: bitsandbytes' backends disagree on the sign of FP4's zero code (tests/formats/test_bnb.py)
        np.testing.assert_array_equal(ours, want)
        np.testing.assert_array_equal(ours[want != 0].view(np.uint32), want[want != 0].view(np.uint32))


@pytest.mark.slow
def test_bnb_logits(bnb_checkpoint):
    _, path, model, _ = bnb_checkpoint
    _check_logits(path, model)
