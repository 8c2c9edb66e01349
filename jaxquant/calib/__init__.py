"""Calibration-based quantization: GPTQ, AWQ, a size-budget auto policy and learned scales (DWQ)."""
