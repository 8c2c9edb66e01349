"""Policies: layer specs, rule matching and order, skip, promotion, fallback, errors that list what
is valid, warnings for rules that match nothing, failures before any work, explain, YAML."""

from __future__ import annotations

import io
import re
import warnings

import pytest

from fake_source import FakeSource, llama_like
from jaxquant.errors import PolicyError
from jaxquant.formats import list_formats
from jaxquant.isq import Layers, Policy, PolicyWarning, Rule, load_policy, preset
from jaxquant.isq.policy import POLICY_DIR, ROLES, RULE_KEYS


class NoLoad(FakeSource):
    """Planning must not read a single tensor."""

    def load(self, name):
        raise AssertionError(f"loaded {name} while planning")


def plan_types(policy: Policy, src) -> dict[str, str]:
    return policy.plan(src).types


# ---- layers -------------------------------------------------------------------------------------

def test_layer_fractions_split_the_model_exactly():
    for n in range(1, 101):
        first, middle, last = (Layers.parse(s).indices(n) for s in ("first 25%", "middle 50%", "last 25%"))
        assert first | middle | last == set(range(n)), n
        assert not (first & middle or middle & last or first & last), n
        assert len(first) == len(last), n  # symmetric
    assert Layers.parse("first 25%").indices(18) == set(range(5))
    assert Layers.parse("last 25%").indices(18) == set(range(13, 18))
    assert Layers.parse("middle 50%").indices(18) == set(range(5, 13))


@pytest.mark.parametrize("spec, want", [
    (3, {3}), (-1, {17}), ("-2", {16}), ("2-5", {2, 3, 4, 5}), ("10:", set(range(10, 18))), ("-4:", {14, 15, 16, 17}),
    (":2", {0, 1}), ("first 3", {0, 1, 2}), ("last 2", {16, 17}), ([0, -1, "4-5"], {0, 4, 5, 17}), (40, set()),
    ("first 100%", set(range(18)))])
def test_layer_specs(spec, want):
    assert Layers.parse(spec).indices(18) == want


@pytest.mark.parametrize("spec", ["first", "25%", "top 25%", "1.5", "a-b", "first 0%", "last 120%", [], True, 2.5])
def test_bad_layer_specs_list_the_valid_forms(spec):
    with pytest.raises(PolicyError, match="first 25%.*last 25%|percentage must be in \\(0, 100\\]"):
        Rule("Q4_0", layers=spec)


# ---- matching and precedence ----------------------------------------------------------------------

def test_rules_match_by_name_role_and_layer_and_the_first_match_wins():
    src = llama_like(n_layer=8)
    policy = Policy(default="Q4_0", rules=[
        Rule("Q8_0", role="attn_v", layers=[0, -1]),
        Rule("Q6_K", name=r"blk\.[0-3]\.ffn_down"),
        Rule("Q5_0", role=["ffn_down", "attn_v"]),
        Rule("Q5_1", layers="last 25%"),
    ])
    types = plan_types(policy, src)
    assert types["blk.0.attn_v.weight"] == types["blk.7.attn_v.weight"] == "Q8_0"
    assert types["blk.3.ffn_down.weight"] == "Q6_K"
    assert types["blk.4.ffn_down.weight"] == types["blk.3.attn_v.weight"] == types["blk.7.ffn_down.weight"] == "Q5_0"
    assert types["blk.6.attn_q.weight"] == types["blk.7.ffn_up.weight"] == "Q5_1"
    assert types["blk.5.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == "Q4_0"
    assert types["blk.0.attn_norm.weight"] == "F32"  # never quantized, whatever the rules
    plan = policy.plan(src)
    assert plan["blk.3.ffn_down.weight"].rule == 1 and plan["blk.5.attn_q.weight"].rule is None


def test_rules_override_a_mix_and_skip_keeps_the_tensor_as_stored():
    src = llama_like(n_layer=8)
    base = plan_types(preset("Q4_K_M"), src)
    types = plan_types(Policy(mix="Q4_K_M", rules=[Rule("skip", role="attn_q"), Rule("Q8_0", name="ffn_up")]), src)
    for name, t in types.items():
        if "attn_q" in name:
            assert t == "F32"
        elif "ffn_up" in name:
            assert t == "Q8_0"
        elif "attn_v" not in name:  # overriding attn_q does not shift llama.cpp's attn_v counter
            assert t == base[name], name
    assert types["blk.0.attn_v.weight"] == base["blk.0.attn_v.weight"] == "Q6_K"


def test_promotion_and_fallback_as_llama_cpp():
    untied, tied = llama_like(hidden=256), llama_like(hidden=320, tied=True)
    assert plan_types(Policy(default="Q4_0"), untied)["output.weight"] == "Q4_0"
    assert plan_types(Policy(default="Q4_0", promote=True), untied)["output.weight"] == "Q6_K"
    promoted = plan_types(Policy(default="Q4_K", promote=True), tied)
    assert promoted["token_embd.weight"] == "Q8_0"  # 320 does not divide into Q4_K's blocks: llama.cpp's Q8_0
    fell = plan_types(Policy(default="Q4_K", rules=[Rule("IQ4_XS", role="ffn_gate"), Rule("Q6_K", role="attn_q")]), tied)
    assert fell["blk.0.attn_k.weight"] == "Q5_0" and fell["blk.0.ffn_gate.weight"] == "IQ4_NL"
    assert fell["blk.0.attn_q.weight"] == "Q8_0" and fell["blk.0.ffn_down.weight"] == "Q4_K"  # ffn_down rows: 512
    assert plan_types(Policy(default="Q6_K", output="Q5_0"), tied)["token_embd.weight"] == "Q5_0"  # tied: the output


def test_ftype():
    assert preset("Q4_K_M").ftype == 15 and preset("Q3_K_S", pure=True).ftype == 11
    assert Policy(default="Q4_K").ftype == 15 and Policy(default="Q8_0").ftype == 7


# ---- errors, warnings ---------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: Rule("Q4_Z"), "unknown format 'Q4_Z'; valid: " + re.escape(", ".join(list_formats(True)))),
    (lambda: Rule("Q4_0", name="blk.(["), "bad regex"),
    (lambda: Rule("Q4_0", role="attn"), "unknown role 'attn'; valid: " + ", ".join(ROLES)),
    (lambda: Policy(mix="Q4_K_X"), "unknown llama.cpp mix 'Q4_K_X'; valid: .*Q4_K_M"),
    (lambda: Policy(mix="Q4_K_M", default="Q4_K"), "not both"),
    (lambda: Policy(), "needs a default format or a mix"),
    (lambda: Policy(default="Q4_0", pure=True), "'pure' applies to a mix"),
    (lambda: Policy(default="Q4_0", embeddings="skip"), "name a format here"),
    (lambda: Policy.from_dict({"default": "Q4_0", "rules": [{"format": "Q4_0", "layer": 3}]}),
     "unknown key 'layer'; valid: " + ", ".join(RULE_KEYS)),
    (lambda: Policy.from_dict({"default": "Q4_0", "rules": [{"role": "attn_q"}]}), "missing 'format'"),
    (lambda: Policy.from_dict({"defaults": "Q4_0"}), "unknown key 'defaults'; valid: name, default, mix"),
    (lambda: Policy.from_dict({"default": "Q4_0", "pure": "yes"}), "'pure' must be true or false"),
    (lambda: Policy.from_dict({"default": "Q4_0", "rules": {"format": "Q4_0"}}), "'rules' must be a list"),
    (lambda: load_policy("no-such-policy"), "unknown policy 'no-such-policy'.*dynamic-gate"),
])
def test_errors_say_what_is_valid(make, match):
    with pytest.raises(PolicyError, match=match):
        make()


def test_rules_that_match_nothing_warn():
    src = llama_like(n_layer=8)
    with pytest.warns(PolicyWarning, match=r"rule 1 \{name=attn_qkv -> Q8_0\} matches no quantizable tensor"):
        Policy(default="Q4_0", rules=[Rule("Q8_0", name="attn_qkv")]).plan(src)
    with pytest.warns(PolicyWarning, match="rule 1 .* matches no"):
        Policy(default="Q4_0", rules=[Rule("Q8_0", layers=12)]).plan(src)  # only 8 layers
    with pytest.warns(PolicyWarning, match="rule 1 .* matches no"):
        Policy(default="Q4_0", rules=[Rule("Q8_0", name="attn_norm")]).plan(src)  # norms are never quantized
    with pytest.warns(PolicyWarning, match=r"rule 2 .* never applies: the 8 tensor\(s\)"):
        Policy(default="Q4_0", rules=[Rule("Q8_0", role="ffn_up"), Rule("Q6_K", name="ffn_up")]).plan(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Policy(default="Q4_0", rules=[Rule("Q8_0", role="ffn_up")]).plan(src)


def test_an_impossible_format_fails_before_any_work_naming_the_tensor():
    src = llama_like(hidden=320)
    src = NoLoad(src.metadata, src.shapes)
    with pytest.raises(PolicyError, match=r"(?s)fallback is off.*tensor 'blk\.0\.attn_k\.weight' \[80, 320\]: Q4_K needs "
                                          r"a row length that is a multiple of 256, this one is 320"):
        Policy(default="Q4_K", fallback=False).plan(src)
    with pytest.raises(PolicyError, match=r"tensor 'token_embd\.weight' \[1000, 320\]: Q6_K needs"):
        Policy(default="Q4_0", embeddings="Q6_K").plan(src)
    with pytest.raises(PolicyError, match=r"this quantization requires an importance matrix! offending tensor: "
                                          r"blk\.1\.ffn_down\.weight, target type: IQ2_XS"):
        preset("IQ2_S").plan(src)  # llama-quantize's refusal without an imatrix
    assert preset("IQ2_S").plan(src, check=False)["blk.1.ffn_down.weight"].format == "IQ2_XS"  # a dry run works
    assert preset("IQ2_S").plan(src, has_imatrix=True).needs_imatrix is None
    assert preset("IQ3_S").plan(src).needs_imatrix is None  # IQ3_S goes without
    odd = NoLoad(src.metadata, {**src.shapes, "blk.0.attn_q.weight": (64, 48)})
    assert preset("Q4_K_M").plan(odd)["blk.0.attn_q.weight"].format == "F16"  # not even 32: llama.cpp's F16


def test_explain_names_each_tensor_format_and_reason():
    src = llama_like(n_layer=8)
    out = io.StringIO()
    plan = Policy(mix="Q4_K_M", rules=[Rule("Q8_0", role="attn_q", layers="first 25%")], name="demo").explain(src,
                                                                                                             file=out)
    text = out.getvalue()
    assert text.startswith("policy demo: llama.cpp mix Q4_K_M, 1 rule(s); model llama, 8 layers, GQA 4")
    assert "rule 1: {role=attn_q layers=first 25% -> Q8_0}" in text
    lines = {line.split()[0]: line for line in text.splitlines()[3:-1]}
    assert set(lines) == set(src.tensor_names)
    assert re.search(r"F32 +-> Q8_0 +rule 1 \{role=attn_q", lines["blk.0.attn_q.weight"])
    assert re.search(r"-> Q6_K +Q4_K_M: ffn_down 0/8: use_more_bits", lines["blk.0.ffn_down.weight"])
    assert re.search(r"-> Q4_K +Q4_K_M: the default", lines["blk.2.attn_q.weight"])
    assert re.search(r"-> F32 +kept: never quantized \(1-D\)", lines["blk.0.attn_norm.weight"])
    assert re.search(r"-> Q6_K +Q4_K_M: output: Q6_K", lines["output.weight"])
    assert text.splitlines()[-1].startswith(f"{len(src.shapes)} tensors (") and "bits per weight" in text
    assert plan.types["blk.0.attn_q.weight"] == "Q8_0"


# ---- YAML ---------------------------------------------------------------------------------------

def test_bundled_yaml_policies(gemma_path):
    from jaxquant.io import open_model

    src = open_model(gemma_path)
    gate = load_policy("dynamic-gate").plan(src, has_imatrix=True)
    assert gate["token_embd.weight"].format == "Q5_1"  # Q5_K, which 640-long rows cannot take: llama.cpp's fallback
    for i in range(18):
        want = "IQ4_XS" if i < 5 or i >= 13 else "IQ2_XXS"
        assert gate[f"blk.{i}.ffn_down.weight"].format == want, i
        assert gate[f"blk.{i}.ffn_up.weight"].format == "IQ4_NL", i  # the 640-long rows fall back
    for t, down in [("IQ1_S", "IQ1_S"), ("IQ1_M", "IQ1_S"), ("IQ2_XXS", "IQ1_M"), ("IQ2_XS", "IQ2_XXS"),
                    ("IQ2_S", "IQ2_XS")]:
        mix = preset(t).plan(src, has_imatrix=True)
        gate = load_policy(f"dynamic-gate-{t.lower()}").plan(src, has_imatrix=True)
        assert gate["token_embd.weight"].format == "Q5_1"
        for name, c in mix._by_name.items():  # DynamicGate differs from the mix only in ffn_down and token_embd
            if "ffn_down" in name:
                i = int(name.split(".")[1])
                assert gate[name].format == ("IQ4_XS" if i < 5 or i >= 13 else down), (t, name)
            elif name != "token_embd.weight":
                assert gate[name].format == c.format, (t, name)
    q = load_policy(POLICY_DIR / "q4_k_m-attn-q8.yaml").plan(src)
    assert q["blk.0.attn_k.weight"].format == q["blk.17.attn_v.weight"].format == "Q8_0"
    assert q["blk.8.ffn_down.weight"].format == "Q4_K" and q["blk.0.ffn_down.weight"].format == "Q6_K"


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: Q4_0\nrules:\n  - {formt: Q8_0}\n")
    with pytest.raises(PolicyError, match=rf"{re.escape(str(bad))}: rule 1: unknown key 'formt'"):
        load_policy(bad)
    bad.write_text("default: [Q4_0\n")
    with pytest.raises(PolicyError, match="invalid YAML"):
        load_policy(bad)
    good = tmp_path / "good.yaml"
    good.write_text("mix: q5_k_m\nrules:\n  - {role: ffn_down, layers: [0, '-2:'], format: q8_0}\n")
    policy = load_policy(good)
    assert policy.name == "good" and policy.mix == "Q5_K_M" and policy.rules[0].format == "Q8_0"
    assert load_policy(good, pure=True).pure


def test_cli_dry_run_and_errors(gemma_path, tmp_path, capsys):
    from jaxquant.cli import main as cli

    out = tmp_path / "x.gguf"
    assert cli(["quantize", gemma_path, str(out), "--type", "q4_k_s", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("policy Q4_K_S: llama.cpp mix Q4_K_S") and not out.exists()
    assert re.search(r"blk\.0\.ffn_down\.weight +\[640, 2048\] +Q6_K +-> Q5_K +Q4_K_S: ffn_down 0/18: first eighth",
                     text)
    assert cli(["quantize", gemma_path, str(out), "--type", "Q4_K_Z"]) == 1
    assert "unknown policy 'Q4_K_Z': not a mix (Q2_K, " in capsys.readouterr().err
    assert cli(["quantize", gemma_path, str(out), "--policy", "dynamic-gate", "--pure"]) == 1
    assert "'pure' applies to a mix only" in capsys.readouterr().err
    assert not out.exists()
