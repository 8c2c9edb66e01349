"""llama.cpp symmetric K-quants (scale only, no minimum): Q3_K, Q6_K (256-element super-blocks)."""
