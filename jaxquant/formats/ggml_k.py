"""llama.cpp K-quants with per-sub-block minimums: Q2_K, Q4_K, Q5_K (256-element super-blocks)."""
