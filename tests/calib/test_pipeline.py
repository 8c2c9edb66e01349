"""The calibration pipeline on a tiny random Llama: ``jaxquant quantize`` with --calib, --dwq and
--target-bpw writes checkpoints that load, in the policy's formats and within the budget, and the
calibration does what it is for: the calibrated model's logits lie closer to the float model's
than round-to-nearest's of the same formats (measured on text the calibration did not see), and
DWQ lowers the KL divergence it trains on."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import models
from jaxquant.calib import CalibratedSource, Calibration, calibrate
from jaxquant.calib.dwq import DWQ
from jaxquant.calib.pipeline import prepare
from jaxquant.cli import main as cli
from jaxquant.errors import PolicyError
from jaxquant.eval.synthetic import english_text
from jaxquant.io import open_model
from jaxquant.isq.policy import Policy
from jaxquant.qtensor import QTensor

POLICY = Policy(default="Q4_0", embeddings="Q8_0", output="Q8_0")


def logits(model, tokens: np.ndarray) -> np.ndarray:
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    return np.asarray(models.forward(model.params, jnp.asarray(tokens), pos, models.init_cache(model.cfg, b, t),
                                     model.cfg)[0])


def held_out(source) -> np.ndarray:
    ids = source.tokenizer.encode(english_text(400, seed=11), add_bos=None, parse_special=False)
    return np.asarray(ids[:256], np.int32).reshape(4, 64)


@pytest.mark.parametrize("method", ["gptq", pytest.param("awq", marks=pytest.mark.slow)])
def test_calibration_beats_round_to_nearest(tiny_llama, tiny_text, method):
    source = open_model(tiny_llama)
    tokens = held_out(source)
    ref = logits(jq.load(CalibratedSource(source, {})), tokens)
    calib = Calibration(method=method, n_ctx=64, n_chunks=16, batch=4)
    errors = {}
    for name, c in (("rtn", Calibration(method="rtn")), (method, calib)):
        model = jq.load(calibrate(source, POLICY, tiny_text, c), isq=POLICY)
        assert model.params.layers[0].ffn_down.fmt == "Q4_0"
        errors[name] = float(np.mean((logits(model, tokens) - ref) ** 2))
    print(errors)
    assert errors[method] < 0.9 * errors["rtn"]


def test_rtn_leaves_formats_without_affine_view_to_isq(tiny_llama, tiny_text):
    source = open_model(tiny_llama)
    policy = Policy(default="IQ4_NL", embeddings="Q8_0", output="Q8_0")
    calibrated = calibrate(source, policy, None, Calibration(method="rtn"))
    assert calibrated.tensors == {}
    assert jq.load(calibrated, isq=policy).params.layers[0].ffn_down.fmt == "IQ4_NL"
    with pytest.raises(PolicyError, match="IQ4_NL: no affine view"):
        calibrate(source, policy, tiny_text, Calibration(method="gptq", n_ctx=64, n_chunks=2))


@pytest.mark.slow
def test_cli_target_bpw_gptq_dwq(tiny_llama, tiny_text, tmp_path):
    text_file = tmp_path / "calib.txt"
    text_file.write_text(tiny_text)
    dst = tmp_path / "out"
    assert cli(["quantize", tiny_llama, str(dst), "--target-bpw", "6", "--formats", "Q4_0,Q5_0,Q8_0", "--calib",
                "gptq", "--calib-file", str(text_file), "--calib-ctx", "64", "--calib-chunks", "8", "--dwq", "4",
                "--no-progress"]) == 0
    policy = Policy.from_yaml(f"{dst}.policy.yaml")
    src = open_model(dst)
    types = {n: src.info(n).type for n in src.tensor_names}
    plan = policy.plan(open_model(tiny_llama))
    assert {n: f for n, f in plan.types.items() if plan[n].requantize} == {
        n: t for n, t in types.items() if plan[n].requantize}
    size = sum(math.prod(src.info(n).shape) for n in src.tensor_names)
    assert 8 * sum(src.info(n).nbytes for n in src.tensor_names) / size <= 6
    assert len(set(types.values()) & {"Q4_0", "Q5_0", "Q8_0"}) >= 2  # the budget mixes formats


@pytest.mark.slow
def test_dwq_lowers_its_kl(tiny_llama, tiny_text):
    source = open_model(tiny_llama)
    learned = prepare(source, POLICY, tiny_text, None, DWQ(steps=12, lr=1e-2, n_ctx=64, n_chunks=8, batch=2))
    q = learned.tensors["blk.0.ffn_down.weight"]
    assert isinstance(q, QTensor) and q.fmt == "Q4_0" and q.arrays["d"].dtype == jnp.float16
    rtn = jq.load(calibrate(source, POLICY, None, Calibration(method="rtn")), isq=POLICY)
    tokens = held_out(source)
    ref = logits(jq.load(CalibratedSource(source, {})), tokens)

    def kl(model):
        t = jax_log_softmax(ref)
        return float(np.mean(np.sum(np.exp(t) * (t - jax_log_softmax(logits(model, tokens))), -1)))

    assert kl(jq.load(learned, isq=POLICY)) < kl(rtn)


def jax_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
