"""An automatic policy under a size budget: per-tensor formats chosen from measured sensitivities.

Sensitivity is the KL divergence from the float model that quantizing one tensor causes, predicted
by the second-order expansion of the KL at the float model (where its gradient vanishes and its
Hessian is the Fisher information): ``e_t(f) = 1/2 sum(F_t * (Q_f(W_t) - W_t)^2)`` with ``F`` the
diagonal of the empirical Fisher, the mean over calibration chunks of the squared gradient of the
chunk's next-token log-likelihood, and ``Q_f`` the format's round-to-nearest, dequantized. (mlx-lm's
first-order estimate, the KL gradient at the all-low-bit model dotted with the weight change, was
tried first: on Gemma-3-270M it predicted no gain from most upgrades and left a third of a Q4_K_M-size
budget unused.) The predictions add up over tensors, so the
choice is a multiple-choice knapsack: minimize ``sum_t e_t(f_t)`` subject to the model's bytes
staying within the budget, solved by dynamic programming over the bytes (``allocate``). The
result is a ``Policy`` of one rule per tensor, written and read back as YAML.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import models
from jaxquant.calib.calibrate import CalibratedSource, Calibration, calibration_chunks
from jaxquant.calib.layerwise import get_path, matrix_paths, with_matrices
from jaxquant.errors import JaxquantError, PolicyError
from jaxquant.formats import get_format, quantize
from jaxquant.isq.policy import Policy, Rule
from jaxquant.qtensor import QTensor

# llama.cpp's types (GGUF output), cheapest first; a tensor's candidates are those its rows fit.
LADDER = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_0", "IQ4_NL", "Q4_K", "Q4_1", "Q5_0", "Q5_K", "Q5_1", "Q6_K", "Q8_0")
SIZE_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
              "TIB": 2**40}


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """Per quantizable tensor: candidate formats (cheapest first), their bytes and predicted KL
    increases; ``fixed_bytes``: the tensors kept as they are; ``n_weights``: all."""

    candidates: dict[str, tuple[str, ...]]
    nbytes: dict[str, tuple[int, ...]]
    delta: dict[str, tuple[float, ...]]
    fixed_bytes: int
    n_weights: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_size(text: str) -> int:
    """'3GB', '512 MiB', '2.5e9' -> bytes (decimal and binary units)."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in SIZE_UNITS:
        raise JaxquantError(f"size {text!r}: write a number and a unit ({', '.join(u for u in SIZE_UNITS if u)})")
    return int(float(m.group(1)) * SIZE_UNITS[unit])


def candidates_for(shape: tuple[int, ...], formats: Sequence[str]) -> tuple[str, ...]:
    """The formats of ``formats`` whose blocks fit the rows, cheapest first (ties: listed order)."""
    fits = [f for f in formats if get_format(f).can_quantize and shape[-1] % get_format(f).block_size == 0]
    return tuple(sorted(fits, key=lambda f: get_format(f).nbytes(shape)))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _nll_grad(weights: dict, params: models.Params, chunks: jax.Array, cfg):
    """Gradient of the summed negative log-likelihood of ``chunks [B, T]``'s next tokens, with the
    matrices ``weights`` (tensor name -> array) put into ``params``."""
    b, t = chunks.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def loss(w):
        logits, _ = models.forward(with_matrices(params, w), chunks, positions, models.init_cache(cfg, b, t), cfg)
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        return -jnp.sum(jnp.take_along_axis(logp, chunks[:, 1:, None], -1))

    return jax.grad(loss)(weights)


_dequantize = jax.jit(lambda q: q.dequantize(jnp.float32))


def _rtn(w: jax.Array, fmt: str, name: str) -> jax.Array:
    q = quantize(w, fmt, name=name)
    return _dequantize(q) if isinstance(q, QTensor) else q.astype(jnp.float32)


def sensitivity(source, text: str, formats: Sequence[str] = LADDER, calib: Calibration | None = None,
                show_progress: bool | None = None) -> Sensitivity:
    """Measure every quantizable tensor's predicted KL increase per candidate format (module doc);
    ``calib`` gives the chunks (``n_ctx``, ``n_chunks``; one chunk per gradient)."""
    from tqdm.auto import tqdm

    calib = calib or Calibration(n_ctx=256, n_chunks=16, batch=1)
    float_source = CalibratedSource(source, {})
    plan = Policy(default="Q8_0", fallback=False, name="quantizable").plan(float_source, check=False)
    quantizable = [c for c in plan.choices if c.requantize]
    cfg = source.config
    teacher = models.load_params(float_source, cfg)
    paths = matrix_paths(teacher)
    cands = {}
    for c in quantizable:
        cands[c.name] = candidates_for(c.shape, formats)
        if not cands[c.name]:
            raise PolicyError(f"tensor {c.name!r} {list(c.shape)}: none of the formats {', '.join(formats)} fits its "
                              "rows; add one with a smaller block")
    chunks = calibration_chunks(source, text, calib)
    weights = {c.name: get_path(teacher, paths[c.name]) for c in quantizable}
    fisher = jax.tree.map(jnp.zeros_like, weights)
    for start in tqdm(range(len(chunks)), desc="gradients", disable=None if show_progress is None else not show_progress):
        g = _nll_grad(weights, teacher, jnp.asarray(chunks[start:start + 1]), cfg)
        fisher = jax.tree.map(lambda f, gi: f + gi * gi, fisher, g)
    delta, nbytes = {}, {}
    for c in tqdm(quantizable, desc="candidates", disable=None if show_progress is None else not show_progress):
        w, f2 = weights[c.name], fisher[c.name] / (2 * len(chunks))
        delta[c.name] = tuple(float(jnp.vdot(f2, jnp.square(_rtn(w, f, c.name) - w))) for f in cands[c.name])
        nbytes[c.name] = tuple(get_format(f).nbytes(c.shape) for f in cands[c.name])
    fixed = sum(source.info(c.name).nbytes for c in plan.choices if not c.requantize)  # kept as stored
    return Sensitivity(cands, nbytes, delta, fixed, sum(math.prod(c.shape) for c in plan.choices))


def allocate(sens: Sensitivity, budget: int, units: int = 1 << 15) -> dict[str, str]:
    """Each tensor's format: the least predicted total KL change whose bytes (with the fixed
    tensors') stay within ``budget``. Exact dynamic programming over the bytes above every tensor's
    cheapest format, counted in ``units`` steps of the room left (each tensor's extra bytes
    rounded up, so it never overshoots; it is optimal for any budget smaller by ``n_tensors`` steps),
    then upgrades into the bytes the rounding left, best predicted gain per byte first. PolicyError
    when even the cheapest formats exceed the budget."""
    names = list(sens.candidates)
    floor = sum(sens.nbytes[n][0] for n in names)
    room = budget - sens.fixed_bytes - floor
    if room < 0:
        raise PolicyError(f"a budget of {budget} bytes is below the smallest model these formats make "
                          f"({floor + sens.fixed_bytes} bytes); lower bits need other formats")
    step = max(1, math.ceil(room / units))
    cap = room // step
    best = np.zeros(cap + 1)  # least total delta within each capacity
    picks = []
    for n in names:
        cost = [math.ceil((b - sens.nbytes[n][0]) / step) for b in sens.nbytes[n]]
        options = np.full((len(cost), cap + 1), np.inf)
        for j, c in enumerate(cost):
            if c <= cap:
                options[j, c:] = best[:cap + 1 - c] + sens.delta[n][j]
        picks.append(np.argmin(options, 0).astype(np.int16))
        best = options.min(0)
    choice, u = {}, cap
    for n, pick in zip(reversed(names), reversed(picks)):
        j = int(pick[u])
        choice[n] = j
        u -= math.ceil((sens.nbytes[n][j] - sens.nbytes[n][0]) / step)
    left = room - sum(sens.nbytes[n][j] - sens.nbytes[n][0] for n, j in choice.items())
    while True:
        upgrade = None
        for n, i in choice.items():
            for j in range(len(sens.candidates[n])):
                extra, gain = sens.nbytes[n][j] - sens.nbytes[n][i], sens.delta[n][i] - sens.delta[n][j]
                if 0 < extra <= left and gain > 0 and (upgrade is None or gain / extra > upgrade[0]):
                    upgrade = (gain / extra, n, j, extra)
        if upgrade is None:
            break
        choice[upgrade[1]], left = upgrade[2], left - upgrade[3]
    return {n: sens.candidates[n][choice[n]] for n in names}


def auto_policy(choice: dict[str, str], name: str = "auto") -> Policy:
    """A policy of one rule per tensor (default: the most common format), for ``choice``."""
    counts: dict[str, int] = {}
    for f in choice.values():
        counts[f] = counts.get(f, 0) + 1
    default = max(counts, key=counts.get)
    rules = tuple(Rule(f, name=f"^{re.escape(n)}$") for n, f in choice.items() if f != default)
    return Policy(default=default, rules=rules, fallback=False, name=name)


def policy_yaml(policy: Policy, comment: str = "") -> str:
    """``policy`` as YAML that ``Policy.from_yaml`` reads back (the keys of ``configs/policies``)."""
    import yaml

    d = {"name": policy.name, "default": policy.default, "fallback": policy.fallback,
         "rules": [{"format": r.format, "name": r.name} for r in policy.rules]}
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    return head + yaml.safe_dump(d, sort_keys=False)


def budget_bytes(sens: Sensitivity, target_bpw: float | None = None, target_size: int | str | None = None) -> int:
    """The budget in bytes of ``--target-bpw`` (bits per weight of the whole model) or ``--target-size``."""
    if (target_bpw is None) == (target_size is None):
        raise JaxquantError("give a target: bits per weight or a size, not both")
    if target_size is not None:
        return parse_size(target_size) if isinstance(target_size, str) else int(target_size)
    return int(target_bpw * sens.n_weights / 8)


def save_policy(policy: Policy, path: str | Path, comment: str = "") -> Path:
    path = Path(path)
    path.write_text(policy_yaml(policy, comment), encoding="utf-8")
    return path
