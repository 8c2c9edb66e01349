"""Fuzzing the GGUF reader: mutations of a tiny valid llama GGUF (gguf-py's writer) run through
everything a user does with a file (open, inspect, load every tensor and dequantize it, config,
tokenizer, ``jaxquant.load``), in a worker process guarded by a time limit per case.

The only allowed outcomes are a valid load or a ``JaxquantError``. The worker loads many cases
(one interpreter, jax imported once); a case that overruns its time is a hang, a worker that dies
is a crash; either way the worker is restarted and the run goes on. Case ``i`` is a pure function
of ``i``, so any failure replays with ``python gguf_fuzz.py replay I``.

    python tests/gguf_fuzz.py run 10000        # counts by outcome, then the failures
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import os
import random
import select
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf

HERE = Path(__file__).resolve().parent
ALIGNMENT = 64  # the seed sets general.alignment, so that mutations can change it
EDGE_INTS = [0, 1, 2, 3, 4, 5, 7, 8, 16, 31, 32, 33, 63, 64, 255, 256, 4096, 2**16, 2**31 - 1, 2**31, 2**32 - 1,
             2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
EDGE_FLOATS = [0.0, -0.0, -1.0, 1e-30, 1e30, 3.4e38, float("inf"), float("-inf"), float("nan"), 65504.0, 1e-45]
BAD_NAMES = [b"nodot", b"", b"blk.9.attn_q.weight", b"blk.0.attn_q.bias", b"blk.x.attn_q.weight", b".", b"...",
             b"blk.0.ffn_up", b"token_embd", b"output.weight", b"rope_freqs.weight", b"\xff\xfe"]


@dataclasses.dataclass
class Layout:
    """Where the seed's fields are: metadata entries and tensor infos, by byte offset."""

    blob: bytes
    header_end: int  # end of the tensor infos (everything a mutation targets, except truncation)
    kvs: list[dict]  # key, key_len_at, type_at, value_at, value type, array item type and count
    tensors: list[dict]  # name, at (name length), n_dims_at, dims_at, n_dims, type_at, offset_at


def seed(folder: Path) -> Path:
    """The seed file: the tiny llama of gguf_samples with general.alignment set."""
    sys.path.insert(0, str(HERE))
    import gguf_samples

    path = folder / "seed.gguf"
    gguf_samples.write_tiny_llama(path, alignment=ALIGNMENT)
    return path


def layout(path: Path) -> Layout:
    r = gguf.GGUFReader(path)
    kvs, tensors = [], []
    for field in r.fields.values():
        if field.name.startswith("GGUF."):
            continue
        key_len = len(field.name.encode())
        at = field.offset
        kvs.append({"key": field.name, "key_len_at": at, "key_at": at + 8, "key_len": key_len,
                    "type_at": at + 8 + key_len, "value_at": at + 12 + key_len, "type": field.types[0],
                    "item": field.types[1] if len(field.types) > 1 else None})
    for t in r.tensors:
        at = t.field.offset
        name_len = len(t.name.encode())
        n_dims = len(t.shape)
        dims_at = at + 8 + name_len + 4
        tensors.append({"name": t.name, "at": at, "name_at": at + 8, "name_len": name_len, "n_dims_at": dims_at - 4,
                        "dims_at": dims_at, "n_dims": n_dims, "type_at": dims_at + 8 * n_dims,
                        "offset_at": dims_at + 8 * n_dims + 4})
    end = tensors[-1]["offset_at"] + 8
    return Layout(path.read_bytes(), end, kvs, tensors)


_SCALAR = {gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
           gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
           gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.UINT64: "<Q", gguf.GGUFValueType.INT64: "<q",
           gguf.GGUFValueType.FLOAT64: "<d", gguf.GGUFValueType.BOOL: "<B"}


def _int(rng: random.Random, fmt: str) -> bytes:
    bits = struct.calcsize(fmt) * 8
    v = rng.choice(EDGE_INTS + [rng.randrange(0, 300)]) % 2**bits
    if fmt.islower() and v >= 2 ** (bits - 1):  # signed formats take the same bits
        v -= 2**bits
    return struct.pack(fmt, v)


def _value(rng: random.Random, fmt: str) -> bytes:
    if fmt in ("<f", "<d"):
        return struct.pack(fmt, rng.choice(EDGE_FLOATS))
    return _int(rng, fmt)


def _mutation(rng: random.Random, lay: Layout, blob: bytearray) -> tuple[str, int, bytes | None, int]:
    """One mutation: (kind, position, new bytes or None, bytes removed). Positions refer to the seed."""
    kind = rng.choice(["header", "kv_type", "kv_value", "kv_value", "kv_length", "key", "ti_name_len", "ti_name",
                       "ti_n_dims", "ti_dim", "ti_dim", "ti_type", "ti_offset", "ti_offset", "alignment", "bytes",
                       "bytes", "insert", "delete"])
    kv, ti = rng.choice(lay.kvs), rng.choice(lay.tensors)
    if kind == "header":
        at, fmt = rng.choice([(4, "<I"), (8, "<Q"), (16, "<Q")])
        return kind, at, _int(rng, fmt), 0
    if kind == "kv_type":
        return kind, kv["type_at"], struct.pack("<I", rng.choice(list(range(14)) + [2**31, 2**32 - 1])), 0
    if kind == "kv_value":
        if kv["type"] in _SCALAR:
            return kind, kv["value_at"], _value(rng, _SCALAR[kv["type"]]), 0
        if kv["type"] == gguf.GGUFValueType.ARRAY and kv["item"] in _SCALAR:  # one element of the array
            size = struct.calcsize(_SCALAR[kv["item"]])
            return kind, kv["value_at"] + 12 + size * rng.randrange(4), _value(rng, _SCALAR[kv["item"]]), 0
        return kind, kv["value_at"] + 8, bytes(rng.randrange(256) for _ in range(rng.randint(1, 4))), 0
    if kind == "kv_length":  # a string's length, or an array's item type or count
        if kv["type"] == gguf.GGUFValueType.ARRAY:
            if rng.random() < 0.3:
                return kind, kv["value_at"], struct.pack("<I", rng.choice(list(range(14)) + [99])), 0
            return kind, kv["value_at"] + 4, _int(rng, "<Q"), 0
        return kind, kv["value_at"] if kv["type"] == gguf.GGUFValueType.STRING else kv["key_len_at"], \
            _int(rng, "<Q"), 0
    if kind == "key":  # a key renamed in place (same length) or its length changed
        if rng.random() < 0.5:
            return kind, kv["key_len_at"], _int(rng, "<Q"), 0
        other = rng.choice(lay.kvs)["key"].encode()[:kv["key_len"]].ljust(kv["key_len"], b"x")
        return kind, kv["key_at"], rng.choice([other, b"\xff" * kv["key_len"]]), 0
    if kind == "ti_name_len":
        return kind, ti["at"], _int(rng, "<Q"), 0
    if kind == "ti_name":  # renamed in place: another tensor's name, no dot, a bad layer, ...
        name = rng.choice(BAD_NAMES + [t["name"].encode() for t in lay.tensors])
        if len(name) == ti["name_len"] or rng.random() < 0.5:  # same length: only the name changes
            return kind, ti["name_at"], name[:ti["name_len"]].ljust(ti["name_len"], b"."), 0
        return kind, ti["at"], struct.pack("<Q", len(name)) + name, 8 + ti["name_len"]
    if kind == "ti_n_dims":
        return kind, ti["n_dims_at"], struct.pack("<I", rng.choice([0, 1, 2, 3, 4, 5, 2**31, 2**32 - 1])), 0
    if kind == "ti_dim":
        return kind, ti["dims_at"] + 8 * rng.randrange(max(ti["n_dims"], 1)), _int(rng, "<Q"), 0
    if kind == "ti_type":
        return kind, ti["type_at"], struct.pack("<I", rng.choice(list(range(42)) + [40, 40, 99, 2**32 - 1])), 0
    if kind == "ti_offset":
        old = struct.unpack_from("<Q", lay.blob, ti["offset_at"])[0]
        new = rng.choice([old + d for d in (-64, -32, -1, 1, 32, 64, 4096)] + EDGE_INTS) % 2**64
        return kind, ti["offset_at"], struct.pack("<Q", new), 0
    if kind == "alignment":
        kv = next(k for k in lay.kvs if k["key"] == "general.alignment")
        return kind, kv["value_at"], struct.pack("<I", rng.choice([0, 1, 2, 3, 8, 16, 32, 48, 128, 256, 4096,
                                                                   2**31, 2**32 - 1])), 0
    at = rng.randrange(lay.header_end)
    if kind == "bytes":
        return kind, at, bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))), 0
    if kind == "insert":
        return kind, at, bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))), -1
    return kind, at, None, rng.randint(1, 16)


def case(lay: Layout, i: int) -> tuple[bytes, list[str]]:
    """Case ``i``: the seed with 1-3 mutations (applied from the end of the file backwards, so
    that the positions stay valid), sometimes truncated; and what was done."""
    rng = random.Random(i)
    muts = sorted((_mutation(rng, lay, bytearray()) for _ in range(rng.choice([1, 1, 1, 2, 3]))),
                  key=lambda m: -m[1])
    blob = bytearray(lay.blob)
    for kind, at, new, removed in muts:
        if removed == -1:
            blob[at:at] = new
        elif new is None:
            del blob[at:at + removed]
        else:
            blob[at:at + (removed or len(new))] = new
    what = [f"{kind}@{at}" for kind, at, _, _ in muts]
    if rng.random() < 0.1:
        cut = rng.randrange(len(blob) + 1)
        blob = blob[:cut]
        what.append(f"cut@{cut}")
    return bytes(blob), what


# ---- the worker: one case after the other, each outcome a line on stdout ---------------------------

def _exercise(path: Path) -> str:
    """What a user does with a file; returns 'loads' or raises."""
    import argparse

    import jax

    import jaxquant as jq
    from jaxquant import cli
    from jaxquant.io import open_model
    from jaxquant.qtensor import QTensor

    src = open_model(path)
    with contextlib.redirect_stdout(io.StringIO()):
        cli.inspect(argparse.Namespace(path=str(path), no_tensors=False))
    for name in src.tensor_names:
        x = src.load(name)
        if isinstance(x, QTensor):
            jax.block_until_ready(x.dequantize())
    _ = src.config, src.tokenizer
    jq.load(path)
    return "loads"


def worker(folder: Path) -> None:
    from jaxquant.errors import JaxquantError

    path = seed(folder)
    lay = layout(path)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything the library prints must not mix with the outcome lines
    _exercise(path)  # imports and compilations happen here, outside the cases' time limits
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        i = int(line)
        blob, _ = case(lay, i)
        path = folder / "case.gguf"
        path.unlink(missing_ok=True)  # a fresh inode: maps of the previous case stay valid
        path.write_bytes(blob)
        try:
            outcome = _exercise(path)
        except JaxquantError as e:
            outcome = f"error {type(e).__name__}"
        except Exception as e:  # noqa: BLE001 - what the fuzzer is looking for
            outcome = f"RAW {type(e).__name__}: {str(e)[:200]!r}"
        out.write(f"{i} {outcome}\n")
        out.flush()


# ---- the driver ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Report:
    counts: collections.Counter
    failures: list[tuple[int, str]]  # (case, outcome) for every hang, crash and raw exception
    seconds: float
    restarts: int


def run(cases: range, time_limit: float = 10.0, folder: Path | None = None) -> Report:
    """Run ``cases`` in a guarded worker; hangs (over ``time_limit`` seconds) and crashes restart it."""
    own = folder is None
    folder = Path(tempfile.mkdtemp(prefix="gguf-fuzz-")) if own else folder
    import jaxquant

    # the worker imports the jaxquant this process imports
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
        [str(Path(jaxquant.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    counts, failures, restarts, start = collections.Counter(), [], -1, time.perf_counter()
    todo = list(cases)
    proc = None
    try:
        while todo:
            if proc is None:
                restarts += 1
                proc = subprocess.Popen([sys.executable, __file__, "worker", str(folder)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
                if proc.stdout.readline() != "ready\n":
                    raise RuntimeError("the fuzz worker did not start: run it alone to see why")
            i = todo.pop(0)
            proc.stdin.write(f"{i}\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], time_limit)
            line = proc.stdout.readline() if ready else None
            if line:
                outcome = line.split(" ", 1)[1].strip()
            else:
                proc.kill()
                outcome = "HANG" if not ready else f"CRASH (exit {proc.wait()})"
            if not line:
                proc.wait()
                proc = None
            kind = outcome if outcome in ("loads", "HANG") or outcome.startswith("error") else outcome.split(":")[0]
            counts[kind.split(" (")[0]] += 1
            if not (outcome == "loads" or outcome.startswith("error")):
                failures.append((i, outcome))
    finally:
        if proc is not None:
            proc.stdin.close()
            proc.wait()
    return Report(counts, failures, time.perf_counter() - start, restarts)


def main(argv: list[str]) -> int:
    if argv[0] == "worker":
        worker(Path(argv[1]))
        return 0
    if argv[0] == "replay":  # one case, in this process, with its traceback
        folder = Path(tempfile.mkdtemp(prefix="gguf-fuzz-"))
        blob, what = case(layout(seed(folder)), int(argv[1]))
        (folder / "case.gguf").write_bytes(blob)
        print(folder / "case.gguf", what)
        print(_exercise(folder / "case.gguf"))
        return 0
    report = run(range(int(argv[1]) if len(argv) > 1 else 1000))
    print(f"{sum(report.counts.values())} cases in {report.seconds:.1f} s ({report.restarts} restarts)")
    for outcome, n in report.counts.most_common():
        print(f"{n:>7}  {outcome}")
    for i, outcome in report.failures:
        print(f"case {i}: {outcome}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
