"""Learned scales (DWQ, after mlx-lm's ``mlx_lm.dwq``): the integer codes of a quantized model stay,
the float fields of its blocks (the formats' ``Affine.scales``: GGUF ``d``/``dmin``/``m``, MLX
scales and biases, GPTQ scales) are learned with optax to minimize the KL divergence from the
float model's token distributions on calibration text, and are stored back in their own dtype, so
the result is the same format (GGUF bytes where the format has a GGML type).

Each learned field is ``f0 * exp(theta)`` with ``theta`` starting at 0: Adam's steps are then
relative changes, alike for tensors whose scales differ by orders of magnitude, and no scale
changes sign. The teacher runs alongside the student in the same jitted step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxquant import models, ops
from jaxquant.calib.calibrate import CalibratedSource, calibration_chunks
from jaxquant.calib.layerwise import get_path, matrix_paths, with_matrices
from jaxquant.calib.targets import affine
from jaxquant.errors import FormatError, JaxquantError
from jaxquant.io.source import Tensor
from jaxquant.qtensor import QTensor


@dataclasses.dataclass(frozen=True)
class DWQ:
    """``steps`` Adam steps of ``lr`` (relative change per step, with cosine decay) over the
    calibration text cut into ``n_chunks`` chunks of ``n_ctx`` tokens, ``batch`` per step (cycled)."""

    steps: int = 200
    lr: float = 2e-3
    n_ctx: int = 256
    n_chunks: int = 64
    batch: int = 1


def learnable(q: QTensor) -> tuple[str, ...]:
    """The float fields DWQ learns in ``q`` (none for formats without an affine view)."""
    try:
        return affine(q.fmt).scales
    except FormatError:
        return ()


def _apply(q: QTensor, theta: dict[str, jax.Array]) -> QTensor:
    """``q`` with each learned field ``f0 * exp(theta)`` (float32, differentiable)."""
    arrays = {**q.arrays, **{k: q.arrays[k].astype(jnp.float32) * jnp.exp(t) for k, t in theta.items()}}
    return QTensor(arrays, q.fmt, q.shape, q.dtype)


def _student(params: models.Params, theta: dict[str, dict[str, jax.Array]]) -> models.Params:
    paths = matrix_paths(params)
    return with_matrices(params, {n: _apply(get_path(params, paths[n]), t) for n, t in theta.items()})


def kl(teacher_logits: jax.Array, logits: jax.Array) -> jax.Array:
    """Mean over tokens of KL(teacher || student) from logits ``[..., V]``."""
    t = jax.nn.log_softmax(teacher_logits, -1)
    return jnp.mean(jnp.sum(jnp.exp(t) * (t - jax.nn.log_softmax(logits, -1)), -1))


def _logits(params: models.Params, chunks: jax.Array, cfg) -> jax.Array:
    b, t = chunks.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    with ops.use_backend("xla"):  # learned fields are float32, which the Pallas kernels do not take
        return models.forward(params, chunks, positions, models.init_cache(cfg, b, t), cfg)[0]


@functools.partial(jax.jit, static_argnames=("cfg", "opt"), donate_argnums=(0, 1))
def _step(theta, opt_state, params, teacher, chunks, cfg, opt):
    import optax

    target = _logits(teacher, chunks, cfg)
    loss, grads = jax.value_and_grad(lambda th: kl(target, _logits(_student(params, th), chunks, cfg)))(theta)
    updates, opt_state = opt.update(grads, opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state, loss


def learn_scales(source, quantized: dict[str, Tensor], text: str, config: DWQ | None = None,
                 show_progress: bool | None = None, log=None) -> tuple[dict[str, Tensor], list[float]]:
    """DWQ of the quantized tensors ``quantized`` (name -> QTensor, as ISQ or ``calibrate`` made
    them) of model ``source``: (the tensors with learned fields, the loss per step)."""
    import optax
    from tqdm.auto import tqdm

    from jaxquant.calib.calibrate import Calibration

    config = config or DWQ()
    cfg = source.config
    teacher = models.load_params(CalibratedSource(source, {}), cfg)
    params = models.load_params(CalibratedSource(source, quantized), cfg)
    paths = matrix_paths(params)
    theta = {n: {k: jnp.zeros(get_path(params, p).arrays[k].shape, jnp.float32) for k in learnable(get_path(params, p))}
             for n, p in paths.items() if isinstance(get_path(params, p), QTensor) and learnable(get_path(params, p))}
    if not theta:
        raise JaxquantError("DWQ: no quantized tensor with learnable scales (formats with an affine view)")
    chunks = calibration_chunks(source, text, Calibration(n_ctx=config.n_ctx, n_chunks=config.n_chunks))
    b = max(1, min(config.batch, len(chunks)))
    opt = optax.adam(optax.cosine_decay_schedule(config.lr, config.steps))
    opt_state = opt.init(theta)
    losses = []
    for step in tqdm(range(config.steps), desc="dwq", disable=None if show_progress is None else not show_progress):
        start = step * b % (len(chunks) - b + 1)
        theta, opt_state, loss = _step(theta, opt_state, params, teacher, jnp.asarray(chunks[start:start + b]), cfg,
                                       opt)
        losses.append(float(loss))
        if log is not None:
            log(f"step {step}: KL {losses[-1]:.5f}")
    out = dict(quantized)
    for n, th in theta.items():  # stored back in each field's own dtype
        orig = get_path(params, paths[n])
        learned = _apply(orig, th).arrays
        out[n] = QTensor({k: learned[k].astype(a.dtype) for k, a in orig.arrays.items()}, orig.fmt, orig.shape,
                         orig.dtype)
    return out, losses
