"""GPU kernel times from JAX's own profiler (CUPTI timestamps): no host dispatch, no timer jitter."""

from __future__ import annotations

import collections
import glob
import os
import tempfile

import jax


def kernel_times(trace_dir: str) -> dict[str, list[float]]:
    """Durations (us) of every GPU kernel in the trace, by kernel name (the stream lines of the GPU
    planes; the derived "XLA Ops" / "XLA Modules" lines would count them twice)."""
    from jax.profiler import ProfileData

    out: dict[str, list[float]] = collections.defaultdict(list)
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if "stream" not in line.name.lower():
                    continue
                for ev in line.events:
                    out[ev.name].append(ev.duration_ns / 1e3)
    return out


def traced(fn, *args, reps: int = 1) -> dict[str, list[float]]:
    """Kernel durations of ``reps`` blocking calls of ``fn(*args)`` (compiled and warmed first)."""
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(reps):
                jax.block_until_ready(fn(*args))
        return kernel_times(d)
