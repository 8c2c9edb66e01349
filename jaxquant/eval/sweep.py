"""Ablation sweeps: a grid of ISQ policies -> PPL, KLD statistics, size and speed per variant.

A sweep config (YAML) names the model, the text, the chunking, and the variants: explicit ones
(``variants``: name + policy, a mix name, a YAML file or an inline policy; none = the model as
stored) and a ``grid`` (presets x override formats x roles x layer ranges). ``model``: "default",
a path, or ``package:NAME/FILE`` (a file an installed package ships). ``imatrix``: the
importance matrix every quantized variant uses, an existing file (``jaxquant imatrix``) or
``{text: {file: PATH} | {words: N, seed: S}, ctx: C, chunks: N}``, which the sweep collects once
from the stored model (as ``jaxquant imatrix`` does) into ``imatrix.gguf``. The base model's
log-probabilities are written once; each variant is loaded through ISQ and compared against
them. Each finished variant is saved as JSON at once, so an interrupted sweep resumes where it
stopped. Results: ``results.csv``, ``results.md`` and ``plot.png`` (KLD and PPL against bits per
weight, Pareto front marked) in the output directory.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml
from jax import monitoring

from jaxquant.errors import JaxquantError
from jaxquant.eval import kld as K
from jaxquant.eval.perplexity import load_model
from jaxquant.eval.synthetic import english_text
from jaxquant.io import DEFAULT_MODEL, open_model
from jaxquant.isq.policy import Policy, load_policy

CONFIG_KEYS = ("name", "model", "text", "calib_text", "ctx", "chunks", "batch", "base", "imatrix", "variants",
               "grid", "out")
COLUMNS = ("variant", "policy", "bytes", "bpw", "ppl", "ppl_error", "ppl_ratio", "kld_mean", "kld_error",
           "kld_p99", "same_top_p", "p_diff_rms", "tokens_per_s", "compiles", "seconds")

_compiles = 0


def _count_compile(event: str, *_args, **_kw) -> None:
    global _compiles
    if event == "/jax/core/compile/backend_compile_duration":
        _compiles += 1


monitoring.register_event_duration_secs_listener(_count_compile)


def compile_count() -> int:
    """XLA compilations in this process so far (a jax.monitoring listener)."""
    return _compiles


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    policy: Any  # None (the model as stored), a mix name, a YAML path or a Policy
    calib: Any = None  # a jaxquant.calib.Calibration: calibrated on the config's calib_text first
    dwq: Any = None  # a jaxquant.calib.dwq.DWQ: then the scales learned on calib_text


@dataclasses.dataclass
class SweepConfig:
    name: str
    model: str
    text: str
    ctx: int
    chunks: int | None
    batch: int
    base: Any
    variants: list[Variant]
    out: Path
    calib_text: str | None = None
    imatrix: Any = None  # None, an imatrix file, or ImatrixSpec

    @property
    def imatrix_path(self) -> str | None:
        if self.imatrix is None:
            return None
        return str(self.out / "imatrix.gguf") if isinstance(self.imatrix, ImatrixSpec) else str(self.imatrix)


@dataclasses.dataclass(frozen=True)
class ImatrixSpec:
    """An imatrix the sweep collects from the stored model: ``text``, ``ctx`` tokens per chunk."""

    text: str
    ctx: int = 512
    chunks: int | None = None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=@-]+", "_", name)


def _grid(grid: dict[str, Any], where: str) -> list[Variant]:
    """presets x (format x role x layers overrides); no override keys: the presets alone."""
    bad = [k for k in grid if k not in ("presets", "format", "role", "layers")]
    if bad:
        raise JaxquantError(f"{where}: grid: unknown key {bad[0]!r}; valid: presets, format, role, layers")
    presets = grid.get("presets") or []
    if not presets:
        raise JaxquantError(f"{where}: grid needs 'presets' (llama.cpp mix names)")
    out = []
    if not any(k in grid for k in ("format", "role", "layers")):
        return [Variant(p, p) for p in presets]
    as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    for preset, fmt, role, layers in itertools.product(presets, as_list(grid.get("format", [])),
                                                       as_list(grid.get("role", [None])),
                                                       as_list(grid.get("layers", [None]))):
        rule = {"format": fmt, **({"role": role} if role else {}), **({"layers": layers} if layers else {})}
        name = f"{preset}+{role or 'all'}@{layers or 'all'}={fmt}"
        out.append(Variant(name, Policy.from_dict({"name": name, "mix": preset, "rules": [rule]}, where)))
    return out


def read_config(path: str | os.PathLike, out: str | os.PathLike | None = None) -> SweepConfig:
    """Parse and check a sweep YAML; relative paths are relative to the YAML's directory."""
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise JaxquantError(f"{path}: cannot read the sweep config ({e})") from None
    if not isinstance(d, dict):
        raise JaxquantError(f"{path}: a sweep config is a mapping with keys {', '.join(CONFIG_KEYS)}")
    bad = [k for k in d if k not in CONFIG_KEYS]
    if bad:
        raise JaxquantError(f"{path}: unknown key {bad[0]!r}; valid: {', '.join(CONFIG_KEYS)}")
    rel = lambda p: str(p if Path(p).is_absolute() else path.parent / p)  # noqa: E731

    def read_text(spec: Any, key: str) -> str:
        spec = spec or {}
        if isinstance(spec, dict) and "file" in spec:  # optionally a [start:end] slice of its characters
            return Path(rel(spec["file"])).read_text(encoding="utf-8")[spec.get("start", 0):spec.get("end")]
        if isinstance(spec, dict) and "words" in spec:
            return english_text(int(spec["words"]), int(spec.get("seed", 0)))
        raise JaxquantError(f"{path}: {key}: give 'file: PATH' (and 'start', 'end') or 'words: N' (a synthetic "
                            "English text)")

    text = read_text(d.get("text"), "text")
    calib_text = read_text(d["calib_text"], "calib_text") if "calib_text" in d else None
    imatrix = d.get("imatrix")
    if isinstance(imatrix, str):
        imatrix = rel(imatrix)
    elif isinstance(imatrix, dict):
        imatrix = ImatrixSpec(read_text(imatrix.get("text"), "imatrix: text"), int(imatrix.get("ctx", 512)),
                              imatrix.get("chunks"))
    elif imatrix is not None:
        raise JaxquantError(f"{path}: imatrix: give a file or {{text: ..., ctx: N, chunks: N}}")
    variants = []
    for i, v in enumerate(d.get("variants") or []):
        if not isinstance(v, dict) or "name" not in v:
            raise JaxquantError(f"{path}: variant {i + 1}: needs a 'name' (and a 'policy'; none: the stored model)")
        policy = v.get("policy")
        if isinstance(policy, dict):
            policy = Policy.from_dict({"name": v["name"], **policy}, f"{path}: variant {v['name']}")
        elif isinstance(policy, str) and policy.endswith((".yaml", ".yml")):
            policy = rel(policy)
        calib, dwq = v.get("calib"), v.get("dwq")
        if calib is not None or dwq is not None:
            from jaxquant.calib import Calibration
            from jaxquant.calib.dwq import DWQ

            if calib_text is None and (dwq is not None or calib.get("method") != "rtn"):
                raise JaxquantError(f"{path}: variant {v['name']}: calibration needs the config's 'calib_text'")
            calib = Calibration.from_dict(calib or {"method": "rtn"}, f"{path}: variant {v['name']}: calib")
            dwq = DWQ(**dwq) if dwq is not None else None
        variants.append(Variant(str(v["name"]), policy, calib, dwq))
    if "grid" in d:
        variants += _grid(d["grid"], str(path))
    names = [v.name for v in variants]
    if not variants or len(set(names)) != len(names):
        raise JaxquantError(f"{path}: needs variants with distinct names (got {names})")
    model = d.get("model", DEFAULT_MODEL)
    model = model if model == DEFAULT_MODEL else _package_file(model, path) if model.startswith("package:") \
        else rel(model)
    out = Path(out) if out else Path(rel(d.get("out", f"results/{d.get('name', path.stem)}")))
    return SweepConfig(d.get("name", path.stem), model, text, int(d.get("ctx", 512)), d.get("chunks"),
                       int(d.get("batch", 1)), d.get("base"), variants, out, calib_text, imatrix)


def _package_file(spec: str, where: Path) -> str:
    """``package:NAME/FILE``: a model file shipped inside an installed Python package (found, not
    imported: a package of model files may import things a sweep does not need)."""
    import importlib.util

    pkg, _, name = spec.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(pkg)
    if found is None or found.origin is None:
        raise JaxquantError(f"{where}: model {spec!r}: package {pkg!r} is not installed (pip install it)")
    path = Path(found.origin).parent / name
    if not path.is_file():
        raise JaxquantError(f"{where}: model {spec!r}: package {pkg!r} has no file {name!r}")
    return str(path)


def _describe(policy) -> str:
    if policy is None:
        return "as stored"
    return policy.name or policy.mix or policy.default if isinstance(policy, Policy) else str(policy)


def _size(model_path: str, policy, has_imatrix: bool = False) -> tuple[int, float]:
    source = open_model(model_path)
    if policy is None:
        infos = [source.info(n) for n in source.tensor_names]
        nbytes, n = sum(i.nbytes for i in infos), sum(i.size for i in infos)
    else:
        plan = load_policy(policy).plan(source, has_imatrix=has_imatrix)
        nbytes, n = sum(c.nbytes for c in plan.choices), sum(math.prod(c.shape) for c in plan.choices)
    return nbytes, 8 * nbytes / n


def run_sweep(cfg: SweepConfig, show_progress: bool | None = None, log=print) -> list[dict[str, Any]]:
    """Run every variant not already done in ``cfg.out``; write the CSV, markdown and plot."""
    (cfg.out / "variants").mkdir(parents=True, exist_ok=True)
    base_path = cfg.out / "base.kld"
    if not base_path.exists():
        tmp = base_path.with_suffix(".tmp")
        K.save_base(load_model(cfg.model, cfg.base), tmp, cfg.text, n_ctx=cfg.ctx, n_chunks=cfg.chunks,
                    batch=cfg.batch, show_progress=show_progress)
        os.replace(tmp, base_path)  # a half-written base is never reused
    base = K.read_base(base_path)
    imatrix = cfg.imatrix_path
    if isinstance(cfg.imatrix, ImatrixSpec) and not Path(imatrix).exists():
        from jaxquant.isq.imatrix import collect_imatrix, write_imatrix

        spec = cfg.imatrix
        im = collect_imatrix(load_model(cfg.model, cfg.base), spec.text, n_ctx=spec.ctx, n_chunks=spec.chunks,
                             batch=cfg.batch, dataset="sweep", show_progress=show_progress)
        write_imatrix(im, imatrix)
        log(f"imatrix: {len(im.entries)} matrices, {im.chunk_count} chunks of {im.chunk_size} tokens")
    for v in cfg.variants:
        done = cfg.out / "variants" / f"{_slug(v.name)}.json"
        if done.exists():
            log(f"[{v.name}] done before, skipped")
            continue
        start, compiles = time.perf_counter(), compile_count()
        weights = imatrix if v.policy is not None else None
        if v.calib is None:
            model = load_model(cfg.model, v.policy, weights)
        else:
            from jaxquant.calib.pipeline import prepare

            model = load_model(prepare(open_model(cfg.model), v.policy, cfg.calib_text, v.calib, v.dwq, show_progress),
                               v.policy, weights)
        res = K.kl_divergence(model, base, batch=cfg.batch, show_progress=show_progress)
        nbytes, bpw = _size(cfg.model, v.policy, weights is not None)
        s = res.stats
        row = {"variant": v.name, "policy": _describe(v.policy), "bytes": nbytes, "bpw": bpw, "ppl": s["ppl"],
               "ppl_error": s["ppl_error"], "ppl_ratio": s["ppl_ratio"], "kld_mean": s["kld_mean"],
               "kld_error": s["kld_error"], "kld_p99": s["kld_p99"], "same_top_p": s["same_top_p"],
               "p_diff_rms": s["p_diff_rms"], "tokens_per_s": res.tokens_per_s,
               "compiles": compile_count() - compiles, "seconds": time.perf_counter() - start, "stats": s}
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(row))
        os.replace(tmp, done)  # a variant killed while saving is not taken as done
        log(f"[{v.name}] bpw {bpw:.3f}  PPL {s['ppl']:.4f}  KLD {s['kld_mean']:.5f}  same top {s['same_top_p']:.2%}  "
            f"{row['compiles']} compiles, {row['seconds']:.0f} s")
    rows = [json.loads((cfg.out / "variants" / f"{_slug(v.name)}.json").read_text()) for v in cfg.variants]
    write_results(rows, cfg.out, cfg.name)
    return rows


def pareto_front(rows: list[dict[str, Any]], y: str) -> list[int]:
    """Indices of the rows no other row beats on both bpw and ``y`` (lower is better for both)."""
    return [i for i, r in enumerate(rows)
            if not any((o["bpw"] <= r["bpw"] and o[y] <= r[y]) and (o["bpw"] < r["bpw"] or o[y] < r[y])
                       for o in rows)]


def write_results(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """results.csv, results.md (Pareto-optimal rows in KLD marked *) and plot.png."""
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    front = set(pareto_front(rows, "kld_mean"))
    lines = [f"# {title}", "", "| variant | bpw | MiB | PPL | PPL ratio | mean KLD | KLD 99% | same top p | "
             "RMS Δp | tokens/s | compiles |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in sorted(enumerate(rows), key=lambda ir: ir[1]["bpw"]):
        lines.append(f"| {r['variant']}{' *' if i in front else ''} | {r['bpw']:.3f} | {r['bytes'] / 2**20:.1f} | "
                     f"{r['ppl']:.4f} ± {r['ppl_error']:.4f} | {r['ppl_ratio']:.4f} | {r['kld_mean']:.5f} | "
                     f"{r['kld_p99']:.4f} | {100 * r['same_top_p']:.2f}% | {100 * r['p_diff_rms']:.2f}% | "
                     f"{r['tokens_per_s']:.0f} | {r['compiles']} |")
    lines += ["", "\\* on the Pareto front of mean KLD against bits per weight."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "plot.png", title)


def plot(rows: list[dict[str, Any]], path: Path, title: str):
    """KLD and PPL against bits per weight, each with its Pareto front; returns the figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "kld_mean", "mean KLD"), (axes[1], "ppl", "PPL")):
        ax.scatter([r["bpw"] for r in rows], [r[key] for r in rows], s=18, color="tab:blue")
        front = sorted((rows[i] for i in pareto_front(rows, key)), key=lambda r: r["bpw"])
        ax.plot([r["bpw"] for r in front], [r[key] for r in front], "o-", color="tab:red", ms=5, label="Pareto front")
        for r in rows:
            ax.annotate(r["variant"], (r["bpw"], r[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if key == "kld_mean" and all(r[key] > 0 for r in rows):
            ax.set_yscale("log")
        ax.set_xlabel("bits per weight")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


__all__ = ["SweepConfig", "ImatrixSpec", "Variant", "read_config", "run_sweep", "write_results", "pareto_front", "plot",
           "compile_count"]
