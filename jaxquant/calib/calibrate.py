"""A whole model calibrated: the float model run layer by layer on calibration text, each layer's
matrices quantized by GPTQ or transformed by AWQ, the result a model source for ISQ.

``calibrate(source, policy, text, Calibration(...))`` plans ``policy`` on the float model (every
tensor of ``source`` dequantized, so each matrix gets the policy's format even where the source
already stores that type), tokenizes the text into chunks as llama-perplexity does, and runs one
jitted call per layer. It returns a ``CalibratedSource``: the source with the calibrated tensors
in place (GPTQ's QTensors; AWQ's scaled and clipped float weights and norms, or its QTensors for
``GPTQ{b}_G{g}``) and every other tensor as float. ISQ with the same policy then quantizes what
is still float and keeps the calibrated tensors as they are (``jaxquant.load(src, isq=policy)``,
``write_quantized_gguf``, ``save_quantized_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import models
from jaxquant.calib import layerwise
from jaxquant.calib.targets import IntTarget, Target, target_for
from jaxquant.errors import FormatError, JaxquantError, PolicyError
from jaxquant.formats import PlainFormat, get_format
from jaxquant.io.source import Tensor, TensorInfo
from jaxquant.isq.policy import Layers, Plan, Policy, load_policy
from jaxquant.qtensor import QTensor

METHODS = ("rtn", "gptq", "awq")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """How to calibrate: ``method`` "gptq", "awq" or "rtn" (round-to-nearest of every matrix by its
    target, GPTQ formats included, on the same float plan: the baseline). Data: ``n_chunks`` chunks of ``n_ctx`` tokens of the text (BOS first, as
    llama-perplexity cuts them), ``batch`` chunks per step inside a layer's jitted call. ``layers``:
    calibrate only these (a ``Layers`` spec such as ``"first 4"``; the others get round-to-nearest).

    GPTQ (AutoGPTQ's defaults): ``block`` columns per lazy update, ``percdamp``, ``act_order``
    (GPTQ formats only), ``sym`` (symmetric GPTQ formats). AWQ (AutoAWQ's): ``n_grid`` scale ratios,
    ``duo_scaling``, ``clip`` (the clipping search over ``clip_tokens`` sampled tokens)."""

    method: str = "gptq"
    n_ctx: int = 512
    n_chunks: int = 128
    batch: int = 4
    layers: Any = None
    block: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    sym: bool = False
    n_grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    clip_tokens: int = 512

    def __post_init__(self):
        if self.method not in METHODS:
            raise JaxquantError(f"calibration method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.layers is not None and not isinstance(self.layers, Layers):
            object.__setattr__(self, "layers", Layers.parse(self.layers, "calibration layers"))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "calibration") -> Calibration:
        names = [f.name for f in dataclasses.fields(cls)]
        bad = [k for k in d if k not in names]
        if bad:
            raise JaxquantError(f"{where}: unknown key {bad[0]!r}; valid: {', '.join(names)}")
        return cls(**d)


class CalibratedSource:
    """``source`` with ``tensors`` in place of its own and every other tensor dequantized to
    float32 (type F32): a model source (``jaxquant.io.Source``) for ISQ, which then requantizes the
    float tensors by its plan and keeps the calibrated ones (their type is their format)."""

    def __init__(self, source, tensors: dict[str, Tensor]):
        self.source, self.tensors = source, tensors

    def __getattr__(self, name: str):  # path, config, tokenizer, metadata, value_types (GGUF)
        return getattr(self.source, name)

    @property
    def tensor_names(self) -> list[str]:
        return self.source.tensor_names

    def info(self, name: str) -> TensorInfo:
        x = self.tensors.get(name)
        if isinstance(x, QTensor):
            return TensorInfo(name, tuple(x.shape), x.fmt, x.nbytes)
        info = self.source.info(name)
        return TensorInfo(name, tuple(info.shape), "F32", 4 * info.size)

    def load(self, name: str) -> Tensor:
        x = self.tensors.get(name)
        if x is not None:
            return x
        x = self.source.load(name)
        return _dequantize(x) if isinstance(x, QTensor) else jnp.asarray(x, jnp.float32)

    def __repr__(self) -> str:
        return f"CalibratedSource({self.source!r}, {len(self.tensors)} calibrated tensors)"


_dequantize = jax.jit(lambda q: q.dequantize(jnp.float32))


def float_plan(source, policy: Policy | str) -> Plan:
    """``policy`` planned on the float model (every tensor of ``source`` as F32)."""
    return load_policy(policy).plan(CalibratedSource(source, {}))


def layer_targets(plan: Plan, layer: models.Layer, index: int, calib: Calibration) -> tuple[tuple[str, Target], ...]:
    """(field, target) of each matrix of layer ``index`` that the plan quantizes; PolicyError for a
    format calibration cannot round into (none for "rtn": ISQ rounds those)."""
    out = []
    for f in layerwise.MATRICES:
        name = layerwise.tensor_name(index, f)
        if getattr(layer, f) is None or name not in plan.types:
            continue
        fmt = plan[name].format
        if isinstance(get_format(fmt), PlainFormat):
            continue
        try:
            t = target_for(fmt, style="awq" if calib.method == "awq" else "gptq", sym=calib.sym)
        except FormatError as e:
            if calib.method == "rtn":  # ISQ rounds it, as without calibration
                continue
            raise PolicyError(f"tensor {name!r}: {e}; give it another format by a policy rule") from None
        if calib.act_order and not isinstance(t, IntTarget):
            raise PolicyError(f"tensor {name!r}: act order needs a GPTQ format, the policy gives {fmt}")
        out.append((f, t))
    return tuple(out)


def calibration_chunks(source, text: str, calib: Calibration) -> np.ndarray:
    """int32 [n_chunks, n_ctx]: the text's chunks as llama-perplexity cuts them (BOS first)."""
    from jaxquant.text import make_chunks

    tok = source.tokenizer
    if tok is None:
        raise JaxquantError("calibration needs a model with a tokenizer")
    tokens = tok.encode(text, add_bos=None, parse_special=False)
    return make_chunks(tokens, calib.n_ctx, calib.n_chunks, tok.bos_id if tok.add_bos else None)


def calibrate(source, policy: Policy | str, text: str | np.ndarray | None, calib: Calibration | None = None,
              show_progress: bool | None = None, log=None) -> CalibratedSource:
    """Calibrate ``source`` (an opened model) for ``policy`` on ``text`` (or on token chunks
    ``int [N, T]`` as they are; None for "rtn") (see the module doc)."""
    from tqdm.auto import tqdm

    from jaxquant.calib import awq, gptq

    calib = calib or Calibration()
    plan = float_plan(source, policy)
    cfg = source.config
    params = models.load_params(source, cfg)
    tensors: dict[str, Tensor] = {}
    if calib.method == "rtn":  # no activations: GPTQ formats rounded here, the others by ISQ
        for i in range(cfg.n_layers):
            layer = layerwise.float_layer(params.layers[i])
            for f, t in layer_targets(plan, layer, i, calib):
                if isinstance(t, IntTarget):
                    tensors[layerwise.tensor_name(i, f)] = t.pack(*t.rtn(getattr(layer, f)))
        return CalibratedSource(source, tensors)
    chunks = calibration_chunks(source, text, calib) if isinstance(text, str) else np.asarray(text, np.int32)
    chosen = calib.layers.indices(cfg.n_layers) if calib.layers is not None else set(range(cfg.n_layers))
    x = layerwise.embed(params, chunks, cfg)
    start = time.perf_counter()
    for i in tqdm(range(cfg.n_layers), desc=calib.method, unit="layer",
                  disable=None if show_progress is None else not show_progress):
        layer = layerwise.float_layer(params.layers[i])
        targets = layer_targets(plan, layer, i, calib)
        run = layerwise.layer_run(cfg, i, len(chunks), calib.batch)
        freqs = layerwise.inv_freq(params, cfg, i)
        if i not in chosen:
            x = _rtn_layer(run, layer, x, freqs, targets, tensors, i, calib.method == "gptq")
        elif calib.method == "gptq":
            out, ok, x = gptq.calibrate_layer(run, layer, x, freqs, targets, calib.block, calib.percdamp,
                                              calib.act_order)
            bad = [f for f, v in ok.items() if not bool(v)]
            if bad:
                raise JaxquantError(f"GPTQ of {layerwise.tensor_name(i, bad[0])}: the damped Hessian is not positive "
                                    f"definite (NaN); raise percdamp (now {calib.percdamp}) or calibrate on more text")
            tensors.update({layerwise.tensor_name(i, f): q for f, q in out.items()})
        else:
            updates, x = awq.calibrate_layer(run, layer, x, freqs, targets, calib)
            tensors.update({layerwise.tensor_name(i, f): v for f, v in updates.items()})
        if log is not None:
            jax.block_until_ready(x)
            log(f"layer {i}: {time.perf_counter() - start:.1f} s")
    return CalibratedSource(source, tensors)


def _rtn_layer(run, layer, x, freqs, targets, tensors, i, feed_quantized: bool) -> jax.Array:
    """A layer left out of calibration: round-to-nearest by each target's format (GPTQ formats
    here, the others by ISQ later); the quantized layer feeds the next one for GPTQ, the float one
    for AWQ (whose layers all see float activations, as AutoAWQ's)."""
    from jaxquant.formats import quantize

    quantized = layer
    for f, t in targets:
        w = getattr(layer, f)
        q = t.pack(*t.rtn(w)) if isinstance(t, IntTarget) else quantize(w, t.fmt, name=layerwise.tensor_name(i, f))
        if isinstance(t, IntTarget):
            tensors[layerwise.tensor_name(i, f)] = q
        quantized = dataclasses.replace(quantized, **{f: q.dequantize(jnp.float32)})
    return jax.jit(layerwise.forward, static_argnums=0)(run, quantized if feed_quantized else layer, x, freqs)
