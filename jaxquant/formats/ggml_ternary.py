"""llama.cpp ternary formats: TQ1_0 and TQ2_0."""
