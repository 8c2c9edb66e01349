"""Writes bnb_codes.npz: bitsandbytes' 8-bit dynamic map (``create_dynamic_map(signed=True)``), the
code of its double quantization. Run once with bitsandbytes installed; the file is committed."""

import pathlib

import numpy as np
from bitsandbytes.functional import create_dynamic_map

np.savez(pathlib.Path(__file__).with_name("bnb_codes.npz"), dynamic=create_dynamic_map(signed=True).numpy())
