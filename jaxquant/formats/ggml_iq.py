"""llama.cpp non-linear 4-bit formats: IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256)."""
