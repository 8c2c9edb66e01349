"""Every llama.cpp mix's per-tensor types against llama.cpp's own choice (llama_quant_compute_types on
a mock model) for random model shapes: architectures, layer counts, GQA, experts, tied embeddings,
rows that do not divide into blocks, --pure, --output-tensor-type, --token-embedding-type and
--tensor-type overrides."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import llama_types
from fake_source import FakeSource
from jaxquant.isq import Policy, PolicyWarning, Rule, mixes

pytestmark = pytest.mark.oracle
MIXES = [m for m in mixes.FTYPES if m not in ("F32", "F16", "BF16")]


# (arch, layers, heads, kv heads, experts, hidden, ffn): the branches' special cases
MODELS = [("llama", 80, 64, 8, 0, 8192, 28672), ("llama", 32, 32, 8, 8, 4096, 14336), ("falcon", 32, 71, 1, 0, 4544, 18176),
          ("phi3", 32, 32, 32, 0, 3072, 8192), ("gemma3", 18, 4, 1, 0, 640, 2048), ("qwen3moe", 48, 32, 4, 4, 2048, 768),
          ("llama", 16, 32, 8, 0, 2048, 8192)]


def random_model(rng: np.random.Generator):
    arch = str(rng.choice(["llama", "qwen2", "qwen3", "gemma3", "falcon", "phi3", "qwen3moe"]))
    n_layer = int(rng.choice([1, 2, 7, 8, 16, 18, 26, 32, 40, 80]))
    if arch in ("qwen2", "falcon", "qwen3moe") and n_layer == 80:
        n_layer = 40  # the mock model does not derive llama.cpp's "70B" for these
    n_head = int(rng.choice([4, 8, 16, 32, 64]))
    n_head_kv = int(rng.choice([d for d in (1, 2, 4, 8, n_head) if n_head % d == 0]))
    n_expert = int(rng.choice([0, 0, 4, 8])) if arch in ("llama", "qwen3moe") else 0
    if arch == "llama" and n_expert == 8 and n_layer == 80:
        n_expert = 4  # the mock calls this 70B, the real loader 8x7B
    hidden = int(rng.choice([640, 1024, 2880, 4096, 96]))
    ff = int(rng.choice([2048, 1536, 11008, 160]))
    return make_model(arch, n_layer, n_head, n_head_kv, n_expert, hidden, ff, tied=rng.random() < 0.5)


def make_model(arch: str, n_layer: int, n_head: int, n_head_kv: int, n_expert: int, hidden: int, ff: int,
               tied: bool = False):
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (1000, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (1000, hidden)
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes[p + "attn_norm.weight"] = (hidden,)
        if arch == "phi3":
            shapes[p + "attn_qkv.weight"] = (3 * hidden, hidden)
        else:
            shapes.update({p + "attn_q.weight": (hidden, hidden), p + "attn_k.weight": (hidden // 4, hidden),
                           p + "attn_v.weight": (hidden // 4, hidden)})
        shapes[p + "attn_output.weight"] = (hidden, hidden)
        if n_expert:
            shapes.update({p + "ffn_gate_inp.weight": (n_expert, hidden), p + "ffn_gate_exps.weight": (n_expert, ff, hidden),
                           p + "ffn_up_exps.weight": (n_expert, ff, hidden),
                           p + "ffn_down_exps.weight": (n_expert, hidden, ff)})
        else:
            shapes.update({p + "ffn_gate.weight": (ff, hidden), p + "ffn_up.weight": (ff, hidden),
                           p + "ffn_down.weight": (hidden, ff)})
    metadata = {"general.architecture": arch, f"{arch}.block_count": n_layer, f"{arch}.attention.head_count": n_head,
                f"{arch}.attention.head_count_kv": n_head_kv, f"{arch}.expert_count": n_expert}
    return FakeSource(metadata, shapes), (arch, n_layer, n_head, n_head_kv, n_expert)


def llama_cpp_types(src: FakeSource, model, mix: str, **kw) -> dict[str, str]:
    order = mixes.tensor_order(src.tensor_names)
    return llama_types.compute_types(*model, [(n, src.shapes[n]) for n in order], mixes.FTYPES[mix][0], **kw)


@pytest.mark.parametrize("case", [*MODELS, *range(10)])
def test_mix_types_equal_llama_cpp(case):
    src, model = make_model(*case) if isinstance(case, tuple) else random_model(np.random.default_rng(case))
    for mix in MIXES:
        assert _types(Policy(mix=mix), src) == llama_cpp_types(src, model, mix), (model, mix)


@pytest.mark.parametrize("seed", range(6))
def test_pure_output_embedding_and_override_types_equal_llama_cpp(seed):
    rng = np.random.default_rng(100 + seed)
    src, model = random_model(rng)
    mix = str(rng.choice(mixes.PRESETS))
    cases = [dict(pure=True), dict(output="Q8_0"), dict(embeddings="Q4_0"), dict(output="Q5_K", embeddings="Q6_K")]
    for kw in cases:
        theirs = llama_cpp_types(src, model, mix, pure=kw.get("pure", False), output_type=kw.get("output"),
                                 embedding_type=kw.get("embeddings"))
        assert _types(Policy(mix=mix, **kw), src) == theirs, (model, mix, kw)
    overrides = [(r"blk\.1\.attn_v", "Q8_0"), (r"ffn_down", "Q4_0"), (r"attn_output", "Q6_K")]
    rules = [Rule(t, name=p) for p, t in overrides]
    assert _types(Policy(mix=mix, rules=rules), src) == llama_cpp_types(src, model, mix, overrides=overrides), \
        (model, mix)


def _types(policy: Policy, src: FakeSource) -> dict[str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PolicyWarning)  # overrides that match nothing are fine here
        return policy.plan(src, check=False).types  # dry run: also the mixes jaxquant cannot quantize
