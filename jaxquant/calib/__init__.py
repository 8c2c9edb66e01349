"""Calibration-based quantization: GPTQ and AWQ (``calibrate``), a size-budget auto policy
(``budget``) and learned scales (``dwq``). See ``calibrate`` for the flow."""

from jaxquant.calib.calibrate import CalibratedSource, Calibration, calibrate

__all__ = ["CalibratedSource", "Calibration", "calibrate"]
