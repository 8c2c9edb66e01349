"""``jaxquant quantize``'s calibration steps in order: an auto policy under a budget (``budget``),
then GPTQ / AWQ (``calibrate``), then learned scales (``dwq``); the result is a source that ISQ
writes with the policy (GGUF or orbax checkpoint)."""

from __future__ import annotations

import math
from pathlib import Path

from jaxquant.calib import budget
from jaxquant.calib.calibrate import CalibratedSource, Calibration, calibrate
from jaxquant.calib.dwq import DWQ, learn_scales
from jaxquant.isq.policy import Policy, load_policy


def auto_policy(source, text: str, *, target_bpw: float | None = None, target_size: int | str | None = None,
                formats=budget.LADDER, calib: Calibration | None = None, save: str | Path | None = None,
                show_progress: bool | None = None, log=print) -> Policy:
    """The policy of least predicted KL divergence within the budget (``budget``), written as YAML to
    ``save`` when given."""
    sens = budget.sensitivity(source, text, formats, calib, show_progress)
    limit = budget.budget_bytes(sens, target_bpw, target_size)
    choice = budget.allocate(sens, limit)
    nbytes = sens.fixed_bytes + sum(sens.nbytes[n][sens.candidates[n].index(f)] for n, f in choice.items())
    predicted = sum(sens.delta[n][sens.candidates[n].index(f)] for n, f in choice.items())
    bpw = 8 * nbytes / sens.n_weights
    name = f"auto {target_bpw} bpw" if target_bpw is not None else f"auto {target_size}"
    policy = budget.auto_policy(choice, name)
    summary = (f"{name}: {nbytes} bytes ({nbytes / 2**20:.2f} MiB), {bpw:.4f} bits per weight, predicted KL "
               f"divergence {predicted:.5f}")
    log(summary)
    if save is not None:
        budget.save_policy(policy, save, f"{summary}\nmade by jaxquant.calib.budget from {Path(str(source.path)).name}")
    return policy


def prepare(source, policy: Policy | str, text: str | None, calib: Calibration | None = None, dwq: DWQ | None = None,
            show_progress: bool | None = None, log=None) -> CalibratedSource:
    """``source`` calibrated for ``policy``: GPTQ/AWQ by ``calib`` (None: round-to-nearest), then DWQ
    when ``dwq`` is given (it learns the scales of the policy's quantization of that result)."""
    from jaxquant.isq.apply import quantize_model

    policy = load_policy(policy)
    calibrated = calibrate(source, policy, text, calib or Calibration(method="rtn"), show_progress, log)
    if dwq is None:
        return calibrated
    quantized = quantize_model(calibrated, policy, show_progress=show_progress)
    learned, losses = learn_scales(source, quantized, text, dwq, show_progress)
    if log is not None:
        first, last = (sum(losses[i:i + 10]) / len(losses[i:i + 10]) for i in (0, max(0, len(losses) - 10)))
        log(f"DWQ: KL {first:.5f} (first 10 steps) -> {last:.5f} (last 10)" if not math.isnan(last) else "DWQ: NaN")
    return CalibratedSource(source, learned)
