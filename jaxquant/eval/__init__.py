"""Measuring quantization error: perplexity and KL-divergence exactly as llama.cpp, per-tensor
error reports, ablation sweeps."""
