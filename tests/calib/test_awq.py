"""AWQ against AutoAWQ 0.2.9's ``AwqQuantizer`` on a small random Llama, in float64.

The reference runs AutoAWQ's own quantizer on a transformers Llama (float64, 2 layers, zero-point
4-bit, groups of 32; ``export_compatible``: the scaled and clipped float weights stay, as they go
to packing). Three of its quirks are removed so that it computes what it means to, in float64:
``state_dict()`` tensors ``.cpu()``-ed as the backup of the weights are the live tensors on a CPU
(the search's in-place scaling then corrupts the backup; on its CUDA path they are copies), the
DynamicCache that transformers 5's ``prepare_inputs_for_generation`` adds to the layer arguments
would accumulate keys over the search's attention calls, and ``x_mean`` and the losses are
accumulated in float32.
jaxquant gets the same layer weights and the same layer-0 input (later layers: its own float
forward, which differs from transformers' by ~1e-8 relative through the float32 rope).

Compared, per layer: the scales and the scaled weights and norms before clipping (rtol 1e-6) and
their codes; the clipping bounds computed from AutoAWQ's own pre-clip weights and features
(identical); AutoAWQ's ``pseudo_quantize_tensor`` of its final weights (codes, scales, zeros). The
clipping search compares candidates whose clamped extreme weights sit on a rounding tie (the
largest lands on code 7.5 by construction), so the end-to-end bounds follow the ~1e-8 upstream
differences at such ties: their flip rate is reported, not required to be zero.
"""

from __future__ import annotations

import contextlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from reference_modules import submodule

from jaxquant.calib import awq, layerwise
from jaxquant.calib.targets import IntTarget
from jaxquant.config import ModelConfig
from jaxquant.models.base import Layer

# transformers' lazy import of cache_utils pulls in hqq (when installed), whose torch.compile warns
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
AWQ_QUANTIZER = submodule("awq", "quantize.quantizer")
AWQ_LLAMA = submodule("awq", "models.llama")
HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
      "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
      "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
LINEARS = tuple(HF)[:7]
BITS, GROUP, N, T = 4, 32, 4, 32


@contextlib.contextmanager
def reference_float64():
    """AutoAWQ computing in float64 without its CPU-only weight corruption (see the module doc)."""
    saved = torch.Tensor.cpu, torch.Tensor.float, AWQ_QUANTIZER.torch, torch.get_default_dtype()
    torch.Tensor.cpu = lambda self, *a, **k: self.clone()
    torch.Tensor.float = lambda self, *a, **k: self.double()
    AWQ_QUANTIZER.torch = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    AWQ_QUANTIZER.torch.float32 = torch.float64
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.Tensor.cpu, torch.Tensor.float, AWQ_QUANTIZER.torch = saved[:3]
        torch.set_default_dtype(saved[3])


def layer_weights(model, i: int) -> dict[str, np.ndarray]:
    sd = model.model.layers[i].state_dict()
    return {f: sd[h + ".weight"].detach().numpy().copy() for f, h in HF.items()}


def autoawq(n_heads: int, n_kv: int):
    """AutoAWQ on a random 2-layer Llama: (config, original layers, layer-0 input, per layer: pre-clip
    weights and features, clip bounds, final weights), and the quantizer (for pseudo_quantize_tensor)."""
    with reference_float64():
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=16,
                                       max_position_embeddings=64, attn_implementation="sdpa")
        torch.manual_seed(n_kv)
        model = transformers.LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
        original = [layer_weights(model, i) for i in range(2)]
        rng = np.random.default_rng(n_kv)
        data = [[int(t) for t in rng.integers(0, 96, T)] for _ in range(N)]
        model_api = AWQ_LLAMA.LlamaAWQForCausalLM
        awq_model = types.SimpleNamespace(model_type="llama", get_model_layers=model_api.get_model_layers,
                                          get_layers_for_scaling=model_api.get_layers_for_scaling,
                                          move_embed=model_api.move_embed)
        q = AWQ_QUANTIZER.AwqQuantizer(awq_model, model, None, BITS, GROUP, True, "gemm", data, None, None, True,
                                       export_compatible=True, max_calib_samples=N, max_calib_seq_len=T)
        q.module_kwargs.pop("cache")
        x0 = q.inps.detach().numpy().copy()
        pre, bounds = [], []
        search, apply = q._search_best_clip, AWQ_QUANTIZER.apply_clip

        def record_search(layer, named, feats):
            pre.append(({n: m.weight.detach().numpy().copy() for n, m in named.items()},
                        {n: v.numpy().copy() for n, v in feats.items()}))
            return search(layer, named, feats)

        q._search_best_clip = record_search
        AWQ_QUANTIZER.apply_clip = lambda m, cl: bounds.append({n: v.numpy()[..., 0] for n, v in cl}) or apply(m, cl)
        try:
            q.quantize()
        finally:
            AWQ_QUANTIZER.apply_clip = apply
        final = [layer_weights(model, i) for i in range(2)]
    return cfg, original, x0, pre, bounds, final, q


def pseudo_quantize(q, w: np.ndarray):
    """AutoAWQ's codes, scales and zeros of ``w``."""
    with reference_float64():
        wq, s, z = (t.numpy() for t in q.pseudo_quantize_tensor(torch.tensor(w)))
    s, z = np.repeat(s, GROUP, 1), np.repeat(z, GROUP, 1)
    return np.round(wq / s + z), s[:, ::GROUP], z[:, ::GROUP]


@pytest.mark.slow
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (8, 4)])  # MHA (v -> o scaled too) and GQA
def test_awq_equals_autoawq(n_heads, n_kv):
    hcfg, original, x0, pre, bounds, final, ref_q = autoawq(n_heads, n_kv)
    cfg = ModelConfig(arch="llama", vocab_size=96, hidden_size=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv,
                      head_dim=16, ffn_dim=128, norm_eps=hcfg.rms_norm_eps, rope_neox=True)
    target = IntTarget(BITS, GROUP, style="awq")
    flips, total = 0, 0
    with jax.enable_x64(True):
        x = jnp.asarray(x0)
        for i in range(2):
            layer = Layer(**{f: jnp.asarray(v) for f, v in original[i].items()})
            run = layerwise.layer_run(cfg, i, N, N)
            freqs = layerwise.inv_freq(types.SimpleNamespace(rope_freqs=None), cfg, i)
            targets = tuple((f, target) for f in LINEARS)
            unclipped, _, _ = awq.transform_layer(run, layer, x, freqs, targets, clip=False)
            clipped, _, y = awq.transform_layer(run, layer, x, freqs, targets)
            ref_pre, ref_feats = pre[i]
            for f in LINEARS:  # scales folded in, before clipping: weights, then their codes
                ours, ref = np.asarray(getattr(unclipped, f)), ref_pre[HF[f]]
                np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6 * np.abs(ref).max(), err_msg=f)
                codes, (s, z) = target.rtn(jnp.asarray(ours))
                ref_codes, ref_s, ref_z = pseudo_quantize(ref_q, ref)
                np.testing.assert_array_equal(np.asarray(codes), ref_codes, err_msg=f)
                np.testing.assert_allclose(np.asarray(s).T, ref_s, rtol=1e-6, err_msg=f)
                np.testing.assert_array_equal(np.asarray(z).T, ref_z, err_msg=f)
            for f in ("attn_norm", "ffn_norm"):
                np.testing.assert_allclose(np.asarray(getattr(unclipped, f)), final[i][f], rtol=1e-6, err_msg=f)
            for name, bound in bounds[i].items():  # the clipping search on AutoAWQ's own inputs: identical
                ours = awq.search_clip(jnp.asarray(ref_pre[name]), jnp.asarray(ref_feats[name]), target.values, GROUP)
                np.testing.assert_array_equal(np.asarray(ours), bound, err_msg=name)
                f = next(k for k, v in HF.items() if v == name)
                ours_w = np.asarray(getattr(clipped, f))
                flips += np.count_nonzero(np.abs(ours_w - final[i][f]).reshape(-1, GROUP).max(1) > 1e-6 * np.abs(
                    final[i][f]).max())
                total += bound.size
            for f in LINEARS:  # AutoAWQ's pseudo-quantization of its final weights, by ours
                codes, (s, z) = target.rtn(jnp.asarray(final[i][f]))
                ref_codes, ref_s, ref_z = pseudo_quantize(ref_q, final[i][f])
                np.testing.assert_array_equal(np.asarray(codes), ref_codes)
                np.testing.assert_allclose(np.asarray(s).T, ref_s, rtol=1e-12)
                np.testing.assert_array_equal(np.asarray(z).T, ref_z)
            x = y
    print(f"clipping bounds that differ end to end (ties): {flips} of {total} groups ({flips / total:.1%})")
    assert flips <= 0.1 * total


def bare_quantizer(duo: bool = True):
    """An ``AwqQuantizer`` with only the settings its search methods read (no model, no data)."""
    q = AWQ_QUANTIZER.AwqQuantizer.__new__(AWQ_QUANTIZER.AwqQuantizer)
    q.w_bit, q.group_size, q.zero_point, q.duo_scaling = BITS, GROUP, True, duo
    q.max_chunk_memory, q.n_parallel_calib_samples = 1 << 30, None
    return q


@pytest.mark.parametrize("duo", [True, False])
def test_scale_and_clip_search_equal_autoawq(duo):
    """One ``up -> down`` group: AutoAWQ's ``_search_best_scale`` (losses and best scales), then
    ``_compute_best_clip`` and ``pseudo_quantize_tensor`` on the scaled weights and inputs."""
    rng = np.random.default_rng(int(duo))
    x = rng.standard_normal((2, 48, 128)) * rng.uniform(0.05, 4, 128)
    up, down = rng.standard_normal((128, 64)) * 0.05, rng.standard_normal((64, 128)) * 0.05
    q, losses = bare_quantizer(duo), []
    with reference_float64():
        block = torch.nn.ModuleDict({"up": torch.nn.Linear(64, 128, bias=False),
                                     "down": torch.nn.Linear(128, 64, bias=False)})
        block["up"].weight.data, block["down"].weight.data = torch.tensor(up), torch.tensor(down)
        compute_loss = q._compute_loss
        q._compute_loss = lambda *a: losses.append(compute_loss(*a)) or losses[-1]
        _, _, ref_s = q._search_best_scale(block, block["up"], [block["down"]], torch.tensor(x))
        ref_s = ref_s.numpy()
        ref_bound = q._compute_best_clip(torch.tensor(down * ref_s), torch.tensor(x / ref_s)).numpy()[..., 0]
    target = IntTarget(BITS, GROUP, style="awq")
    with jax.enable_x64(True):
        w = jnp.asarray(down)
        s, ours = awq.search_scale(jnp.asarray(x), [w], [target.values], [GROUP],
                                   lambda ws: jnp.einsum("ntk,rk->ntr", jnp.asarray(x), ws[0]), 20, duo)
        np.testing.assert_allclose(np.asarray(ours), losses, rtol=1e-9)
        np.testing.assert_allclose(np.asarray(s), ref_s, rtol=1e-12)
        bound = awq.search_clip(jnp.asarray(down * ref_s), jnp.asarray(x / ref_s), target.values, GROUP)
        np.testing.assert_array_equal(np.asarray(bound), ref_bound)
        clipped = np.clip((down * ref_s).reshape(64, -1, GROUP), -ref_bound[..., None], ref_bound[..., None])
        codes, (scale, zero) = target.rtn(jnp.asarray(clipped.reshape(64, 128)))
    ref_codes, ref_scale, ref_zero = pseudo_quantize(q, clipped.reshape(64, 128))
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    np.testing.assert_allclose(np.asarray(scale).T, ref_scale, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(zero).T, ref_zero)
