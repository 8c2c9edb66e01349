"""Importance matrices as llama.cpp's ``llama-imatrix`` makes them: per weight matrix, the sum over
tokens of each input column's squared activation and the number of tokens, collected while the
model runs on a calibration text; read and written in llama.cpp's GGUF imatrix format (and its
legacy ``.dat`` format read too). ``Imatrix.weights()`` gives llama-quantize's per-column
importance (sum / count), which the formats' quantizers take as ``weights``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import FileFormatError
from jaxquant.io.output import atomic_output

IN_SUM2, COUNTS = ".in_sum2", ".counts"


@dataclasses.dataclass
class Imatrix:
    """``sums[name]``: float32 [n_mat, K] (n_mat: experts, 1 for a plain matrix); ``counts[name]``:
    float32 [n_mat] tokens seen per matrix. ``legacy``: read from a ``.dat`` file, whose sums are
    llama.cpp's ``(sum / count) * ncall`` with ``counts`` = [ncall]."""

    sums: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    counts: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    datasets: list[str] = dataclasses.field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    @property
    def entries(self) -> list[str]:
        return sorted(self.sums)

    def weights(self) -> dict[str, np.ndarray]:
        """llama-quantize's ``load_imatrix``: name -> float32 [n_mat * K], each matrix's sums divided
        by its count (rounded to an integer as llama.cpp reads it), 1 where nothing was counted."""
        out = {}
        for name, sums in self.sums.items():
            counts = self.counts[name]
            if self.legacy:
                ncall = int(counts[0]) if counts.size else 0
                out[name] = (sums / np.float32(ncall) if ncall > 0 else sums).reshape(-1).astype(np.float32)
                continue
            c = np.trunc(counts + np.copysign(np.float32(0.5), counts))[:, None]  # std::lround: halves away from 0
            w = np.where(c > 0, sums / np.where(c > 0, c, np.float32(1)), np.float32(1))
            out[name] = w.reshape(-1).astype(np.float32)
        return out


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """A GGUF imatrix (``llama-imatrix`` / ``jaxquant imatrix``) or a legacy ``.dat`` file."""
    path = Path(path)
    if path.exists() and not path.is_file():  # opening a FIFO would wait for a writer forever
        raise FileFormatError(f"{path}: not a regular file (a directory, FIFO or device); give an imatrix file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise FileFormatError(f"{path}: cannot open ({e.strerror})") from None
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    from jaxquant.io.gguf import GGUFSource

    src = GGUFSource(path)
    meta = src.metadata
    datasets = meta.get("imatrix.datasets", [])
    im = Imatrix(datasets=[d if isinstance(d, str) else d.decode("utf-8", "replace") for d in datasets],
                 chunk_count=int(meta.get("imatrix.chunk_count", 0)), chunk_size=int(meta.get("imatrix.chunk_size", 0)))
    pairs: dict[str, dict[str, str]] = {}
    for name in src.tensor_names:
        for suffix in (IN_SUM2, COUNTS):
            if name.endswith(suffix):
                pairs.setdefault(name.removesuffix(suffix), {})[suffix] = name
    if not pairs:
        raise FileFormatError(f"{path}: no imatrix data (no '*.in_sum2' / '*.counts' tensors)")
    for name, parts in sorted(pairs.items()):
        if len(parts) != 2:
            raise FileFormatError(f"{path}: mismatched sums and counts for {name!r}")
        infos = [src.info(parts[s]) for s in (IN_SUM2, COUNTS)]
        if any(i.type != "F32" for i in infos):
            raise FileFormatError(f"{path}: sums and counts for {name!r} must be F32, found "
                                  f"{infos[0].type} and {infos[1].type}")
        sums = np.array(src.raw(parts[IN_SUM2]).view(np.float32))
        counts = np.array(src.raw(parts[COUNTS]).view(np.float32))
        if not counts.size or sums.size % counts.size:
            raise FileFormatError(f"{path}: {name!r} has {sums.size} sums for {counts.size} counts")
        im.sums[name] = sums.reshape(counts.size, -1)
        im.counts[name] = counts
    return im


def _read_legacy(path: Path) -> Imatrix:
    """common_imatrix_load_legacy: int32 entry count, then per entry the name, ncall, nval and
    nval float32 values; optionally the chunk count and the dataset name."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise FileFormatError(f"{path}: truncated legacy imatrix (reading {fmt!r} at offset {pos})")
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise FileFormatError(f"{path}: not an imatrix (GGUF or legacy .dat): {n_entries} entries")
    im = Imatrix(legacy=True)
    for _ in range(n_entries):
        (length,) = take("<i")
        name = bytes(take(f"<{length}s")[0]).decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise FileFormatError(f"{path}: entry {name!r} has {nval} values")
        im.sums[name] = np.array(take(f"<{nval}f"), np.float32)[None, :]
        im.counts[name] = np.array([ncall], np.float32)
    if pos + 4 <= len(data):
        (im.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if length > 0 and pos + length <= len(data):
                im.datasets.append(data[pos:pos + length].decode("utf-8", "replace"))
    return im


def _writer_class():
    import gguf

    class Writer(gguf.GGUFWriter):
        """gguf-py's writer, which also writes empty arrays (llama-imatrix writes an empty dataset
        list when it read no text file)."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
                return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def write_imatrix(im: Imatrix, path: str | os.PathLike) -> None:
    """llama-imatrix's GGUF layout (IMatrixCollector::save_imatrix): ``general.type`` 'imatrix',
    the datasets, chunk count and size, then ``<name>.in_sum2`` [n_mat, K] and ``<name>.counts``
    [n_mat, 1] (F32) in name order. The file appears atomically (``atomic_output``)."""
    import gguf

    path = Path(path)
    if im.legacy:
        raise FileFormatError("a legacy imatrix holds normalized sums, not llama-imatrix's raw ones; it cannot be "
                              "written as GGUF")
    with atomic_output(path) as tmp:
        w = _writer_class()(tmp, arch="")
        w.kv_data[0].clear()  # no general.architecture: llama-imatrix writes none
        w.add_string("general.type", "imatrix")
        w.add_key_value("imatrix.datasets", list(im.datasets), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
        w.add_uint32("imatrix.chunk_count", im.chunk_count)
        w.add_uint32("imatrix.chunk_size", im.chunk_size)
        for name in im.entries:
            sums, counts = np.asarray(im.sums[name], np.float32), np.asarray(im.counts[name], np.float32)
            lead = (counts.size,) if counts.size > 1 else ()  # ggml drops trailing dimensions of 1
            w.add_tensor(name + IN_SUM2, sums.reshape(*lead, -1))
            w.add_tensor(name + COUNTS, counts.reshape(*lead, 1))
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()


def as_weights(imatrix: Imatrix | Mapping[str, np.ndarray] | str | os.PathLike | None) -> dict[str, np.ndarray]:
    """Quant weights by tensor name from an Imatrix, a file, or a mapping of them."""
    if imatrix is None:
        return {}
    if isinstance(imatrix, (str, os.PathLike)):
        imatrix = read_imatrix(imatrix)
    if isinstance(imatrix, Imatrix):
        imatrix = imatrix.weights()
    out = {}
    for name, w in imatrix.items():
        w = np.asarray(w, np.float32).reshape(-1)
        if not np.isfinite(w).all():
            raise FileFormatError(f"imatrix entry {name!r} holds a non-finite value; llama.cpp refuses such files")
        out[name] = w
    return out


# ---- collecting ---------------------------------------------------------------------------------

def _matrix_names(params) -> dict[int, str]:
    """id of each block weight matrix -> its GGUF name; llama-imatrix collects the inputs of these
    (``blk.*`` matmuls), not of the output projection."""
    names = {}
    for i, layer in enumerate(params.layers):
        for field in dataclasses.fields(layer):
            w = getattr(layer, field.name)
            if w is not None and getattr(w, "ndim", 0) == 2 and not field.name.endswith("_bias"):
                names[id(w)] = f"blk.{i}.{field.name}.weight"
    return names


@functools.partial(jax.jit, static_argnames=("cfg",))
def _chunk_stats(params, chunks: jax.Array, cfg) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Run chunks [B, n_ctx] from an empty cache; per block matrix: (sum over the B * n_ctx tokens
    of each input column squared [K], tokens seen). The weights are recognized by identity while
    tracing, through the qdot tap."""
    from jaxquant import models, ops

    names, stats = _matrix_names(params), {}

    def record(x: jax.Array, w) -> None:
        name = names.get(id(w))
        if name is not None:
            x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            s, n = jnp.sum(x2 * x2, axis=0), x2.shape[0]
            old = stats.get(name)
            stats[name] = (s, jnp.float32(n)) if old is None else (old[0] + s, old[1] + n)

    b, n_ctx = chunks.shape
    positions = jnp.broadcast_to(jnp.arange(n_ctx, dtype=jnp.int32), (b, n_ctx))
    with ops.tap(record):
        models.hidden_states(params, chunks, positions, models.init_cache(cfg, b, n_ctx), cfg)
    return stats


def collect_imatrix(model, text: str, n_ctx: int = 512, n_chunks: int | None = None, batch: int = 1,
                    dataset: str = "", show_progress: bool | None = None) -> Imatrix:
    """llama-imatrix on ``model`` (a ``jaxquant.Model``): the text tokenized as llama.cpp does,
    cut into ``n_chunks`` chunks of ``n_ctx`` tokens (BOS first where the vocabulary adds it),
    each run from an empty cache; per block matrix the sum of squared inputs per column and the
    token count. ``batch`` chunks run per device call."""
    from tqdm.auto import tqdm

    from jaxquant.text import check_chunking, make_chunks, tokenize

    check_chunking(n_ctx, n_chunks, batch)
    tok = model.tokenizer
    chunks = make_chunks(tokenize(tok, text), n_ctx, n_chunks, tok.bos_id if tok.add_bos else None)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.float32] = {}
    with tqdm(total=len(chunks), unit="chunk", desc="imatrix",
              disable=None if show_progress is None else not show_progress) as bar:
        for start in range(0, len(chunks), batch):  # a shorter last batch compiles once more
            part = chunks[start:start + batch]
            for name, (s, n) in _chunk_stats(model.params, jnp.asarray(part), model.cfg).items():
                # accumulated in float32 from call to call, as llama.cpp accumulates
                sums[name] = sums.get(name, np.float32(0)) + np.asarray(s, np.float32)
                counts[name] = counts.get(name, np.float32(0)) + np.float32(n)
            bar.update(len(part))
    return Imatrix({k: v[None, :] for k, v in sorted(sums.items())},
                   {k: np.array([v], np.float32) for k, v in sorted(counts.items())},
                   [dataset] if dataset else [], len(chunks), n_ctx)
