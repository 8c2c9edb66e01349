"""Microscaling formats: MXFP4 (E2M1 values, E8M0 shared exponent per 32)."""
