"""The ``jaxquant`` command: a thin dispatcher, one subcommand per user verb."""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence

from jaxquant.errors import JaxquantError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``run(args) -> exit code`` as subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, arguments, run)
        return run

    return register


# ---- inspect ------------------------------------------------------------------------------------

def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", default="default",
                   help="GGUF file or Hugging Face checkpoint directory (default: the embedded Gemma-3-270M)")
    p.add_argument("--no-tensors", action="store_true", help="print the totals and metadata only")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _short(value) -> str:
    if isinstance(value, list):
        return f"[{len(value)} items]" if len(value) > 8 else repr(value)
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


@command("inspect", "tensors (name, shape, type, bits per weight, bytes), totals and metadata of a model",
         _inspect_arguments)
def inspect(args: argparse.Namespace) -> int:
    from jaxquant.io import GGUFSource, open_model

    src = open_model(args.path)
    infos = [src.info(n) for n in src.tensor_names]
    print(f"{src.path}")
    if not args.no_tensors:
        width = max((len(i.name) for i in infos), default=4)
        print(f"\n{'tensor':<{width}}  {'shape':<20} {'type':<8} {'bpw':>7} {'bytes':>12}")
        for i in infos:
            print(f"{i.name:<{width}}  {list(i.shape)!s:<20} {i.type:<8} {i.bits_per_weight:>7.4f} {i.nbytes:>12}")

    per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for i in infos:
        t = per_type[i.type]
        t[0], t[1], t[2] = t[0] + 1, t[1] + i.size, t[2] + i.nbytes
    print(f"\n{'type':<10} {'tensors':>7} {'weights':>13} {'bpw':>7} {'bytes':>12}")
    for name, (count, size, nbytes) in sorted(per_type.items(), key=lambda kv: -kv[1][2]):
        print(f"{name:<10} {count:>7} {size:>13} {8 * nbytes / max(size, 1):>7.4f} {nbytes:>12}")
    size = sum(i.size for i in infos)
    data = sum(i.nbytes for i in infos)
    print(f"{'tensors':<10} {len(infos):>7} {size:>13} {8 * data / max(size, 1):>7.4f} {data:>12}  "
          f"({_human(data)}; bits per weight of the whole model)")
    if isinstance(src, GGUFSource):
        layout = src.layout()
        for part in ("header", "metadata", "tensor_info", "padding"):
            print(f"{part:<10} {'':>7} {'':>13} {'':>7} {layout[part]:>12}")
        print(f"{'file':<10} {'':>7} {'':>13} {'':>7} {layout['file']:>12}  ({_human(layout['file'])})")

    print("\nconfig")
    try:
        config = src.config
    except JaxquantError as e:
        print(f"  {e}")
    else:
        for key, value in vars(config).items():
            print(f"  {key}: {_short(value)}")
    print("\nmetadata")
    for key, value in src.metadata.items():
        if key.startswith("general.") or not isinstance(value, list):
            print(f"  {key}: {_short(value)}")
    return 0


# ---- generate -----------------------------------------------------------------------------------

def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", default="default", metavar="MODEL",
                   help="GGUF file or Hugging Face checkpoint directory (default: the embedded Gemma-3-270M)")
    p.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's message)")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--isq", metavar="MIX", help="quantize at load: a llama.cpp mix (Q4_K_M, ...) or a policy YAML")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix for --isq")


@command("generate", "continue a prompt (or answer it with --chat), streaming the text", _generate_arguments)
def generate(args: argparse.Namespace) -> int:
    import time

    import jaxquant
    from jaxquant.generate import Sampling, stream

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.min_p)  # bad values fail before loading
    if not args.prompt:
        raise JaxquantError("the prompt is empty")
    model = jaxquant.load(None if args.path == "default" else args.path, isq=args.isq, imatrix=args.imatrix)
    start, first = time.perf_counter(), None
    for (text,) in stream(model, [args.prompt], max_tokens=args.max_tokens, sampling=sampling, seed=args.seed,
                          chat=args.chat):
        first = first or time.perf_counter()
        print(text, end="", flush=True)
    print()
    print(f"[{time.perf_counter() - start:.1f} s, first token after {first - start:.1f} s (compiles)]",
          file=sys.stderr)
    return 0


# ---- perplexity ---------------------------------------------------------------------------------

def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", default="default", metavar="MODEL",
                   help="GGUF file or Hugging Face checkpoint directory (default: the embedded Gemma-3-270M)")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--isq", metavar="MIX", help="requantize with a llama.cpp mix first (e.g. Q4_0, Q4_K_M)")
    quant.add_argument("--policy", metavar="YAML", help="requantize with an ISQ policy file first")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix for --isq/--policy")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("--file", required=True, metavar="TEXT", help="the text file to evaluate")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512, as llama-perplexity)")
    p.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: all)")
    p.add_argument("--batch", type=int, default=1, help="chunks per device call (default 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _load_for_eval(args: argparse.Namespace):
    from jaxquant.eval.perplexity import load_model

    return load_model(None if args.path == "default" else args.path, args.isq or args.policy, args.imatrix)


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise JaxquantError(f"{path}: cannot read the text file ({e.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JaxquantError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it first, e.g. "
                            f"iconv -f latin1 -t utf-8") from None


def _check_eval_arguments(args: argparse.Namespace) -> None:
    """Bad counts fail before the model loads."""
    from jaxquant.text import check_chunking

    check_chunking(args.ctx, args.chunks, args.batch)


@command("perplexity", "perplexity of a text as llama-perplexity computes it", _eval_arguments)
def perplexity(args: argparse.Namespace) -> int:
    import json

    from jaxquant.eval.perplexity import perplexity as run

    _check_eval_arguments(args)
    text = _read_text(args.file)
    res = run(_load_for_eval(args), text, n_ctx=args.ctx, n_chunks=args.chunks, batch=args.batch,
              show_progress=None if not args.json else False)
    if args.json:
        print(json.dumps(res.as_dict()))
    else:
        print(f"{res.n_tokens} tokens, {res.n_chunks} chunks of {res.n_ctx}, {res.count} scored, "
              f"{res.tokens_per_s:.0f} tokens/s")
        print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.error:.5f}")
    return 0


# ---- kld ----------------------------------------------------------------------------------------

def _kld_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("--base", required=True, metavar="FILE",
                   help="the base log-probabilities (llama.cpp's --kl-divergence-base format): written with "
                        "--file, compared against without")
    p.add_argument("--file", metavar="TEXT", help="write MODEL's log-probabilities of this text to --base")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk when writing (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: all)")
    p.add_argument("--batch", type=int, default=1, help="chunks per device call (default 1)")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")


@command("kld", "KL-divergence against a base model's saved log-probabilities, as llama-perplexity "
         "--kl-divergence", _kld_arguments)
def kld(args: argparse.Namespace) -> int:
    import json

    from jaxquant.eval import kld as K

    quiet = False if args.json else None
    _check_eval_arguments(args)
    if args.file is not None:
        text = _read_text(args.file)
        ppl = K.save_base(_load_for_eval(args), args.base, text, n_ctx=args.ctx, n_chunks=args.chunks,
                          batch=args.batch, show_progress=quiet)
        print(json.dumps({"base": args.base, "ppl": ppl}) if args.json else f"{args.base}: written; PPL {ppl:.4f}")
        return 0
    res = K.kl_divergence(_load_for_eval(args), args.base, n_chunks=args.chunks, batch=args.batch,
                          show_progress=quiet)
    print(json.dumps(res.stats) if args.json else K.format_report(res.stats))
    return 0


# ---- quantize -----------------------------------------------------------------------------------

def _quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="GGUF file (any type: quantized tensors are dequantized first), "
                                              "Hugging Face checkpoint directory or jaxquant checkpoint")
    p.add_argument("dst", metavar="DST", help="a .gguf file, or an orbax checkpoint directory (with --hf: a Hugging "
                                              "Face checkpoint directory)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--type", metavar="MIX", help="a llama.cpp mix: " + ", ".join(_presets()))
    how.add_argument("--policy", metavar="YAML", help="an ISQ policy file (or a name in configs/policies)")
    how.add_argument("--target-bpw", type=float, metavar="BPW", help="choose each tensor's format from measured "
                     "sensitivities for this many bits per weight (needs --calib-file); the policy goes to --save-policy")
    how.add_argument("--target-size", metavar="SIZE", help="as --target-bpw, for a size such as 3GB or 200MiB")
    p.add_argument("--pure", action="store_true", help="every tensor the mix's default type (llama-quantize --pure)")
    p.add_argument("--formats", metavar="LIST", help="candidate formats of --target-bpw/--target-size, comma-separated "
                                                     "(default: llama.cpp's Q2_K ... Q8_0)")
    p.add_argument("--save-policy", metavar="YAML", help="where the chosen policy goes (default: DST.policy.yaml)")
    p.add_argument("--calib", choices=("gptq", "awq"), help="calibrate the block matrices by GPTQ or AWQ first")
    p.add_argument("--calib-file", metavar="TEXT", help="calibration text of --calib, --dwq and --target-bpw")
    p.add_argument("--calib-ctx", type=int, default=512, help="tokens per calibration chunk (default 512)")
    p.add_argument("--calib-chunks", type=int, default=128, help="calibration chunks (default 128)")
    p.add_argument("--act-order", action="store_true", help="GPTQ in order of decreasing activation (GPTQ formats)")
    p.add_argument("--dwq", type=int, default=0, metavar="STEPS", help="learn the scales for this many steps (DWQ)")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix (llama-imatrix or jaxquant imatrix file)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (each tensor's format and why) and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--hf", choices=("gptq", "awq"), help="write DST as a Hugging Face GPTQ or AWQ (GEMM) checkpoint "
                   "that transformers loads (every block matrix in one GPTQ{b}_G{g} format)")


def _persistent_compilation_cache() -> None:
    """Keep XLA's compiled quantizers in ``$JAXQUANT_CACHE/xla`` across runs (compiling them is most
    of a small model's quantization time), unless JAX is told otherwise."""
    import os
    from pathlib import Path

    import jax

    if not jax.config.jax_compilation_cache_dir:
        cache = Path(os.environ.get("JAXQUANT_CACHE", Path.home() / ".cache" / "jaxquant")) / "xla"
        jax.config.update("jax_compilation_cache_dir", str(cache))


def _presets() -> list[str]:
    from jaxquant.isq import PRESETS

    return list(PRESETS)


@command("quantize", "quantize a model by a llama.cpp mix or a policy, into GGUF or an orbax checkpoint",
         _quantize_arguments)
def quantize(args: argparse.Namespace) -> int:
    import time

    from jaxquant.io import open_model
    from jaxquant.io.output import check_output_path
    from jaxquant.isq import load_policy
    from jaxquant.isq.apply import imatrix_metadata, save_quantized_checkpoint, save_quantized_hf, write_quantized_gguf
    from jaxquant.isq.imatrix import read_imatrix

    auto = args.target_bpw is not None or args.target_size is not None
    policy = None if auto else load_policy(args.type or args.policy, pure=args.pure)  # bad names fail early
    imatrix = read_imatrix(args.imatrix) if args.imatrix else None
    text = None
    if auto or args.calib or args.dwq:
        if not args.calib_file:
            raise JaxquantError("--target-bpw, --target-size, --calib and --dwq need calibration text: --calib-file")
        text = _read_text(args.calib_file)
    source = open_model(args.src)
    if auto or args.calib or args.dwq:
        from jaxquant.calib import Calibration
        from jaxquant.calib.budget import LADDER
        from jaxquant.calib.dwq import DWQ
        from jaxquant.calib.pipeline import auto_policy, prepare

        if auto:
            policy = auto_policy(source, text, target_bpw=args.target_bpw, target_size=args.target_size,
                                 formats=args.formats.split(",") if args.formats else LADDER,
                                 save=args.save_policy or f"{args.dst.rstrip('/')}.policy.yaml",
                                 log=lambda m: print(m, file=sys.stderr))
        if (args.calib or args.dwq) and not args.dry_run:
            calib = Calibration(args.calib, n_ctx=args.calib_ctx, n_chunks=args.calib_chunks,
                                act_order=args.act_order) if args.calib else None
            source = prepare(source, policy, text, calib, DWQ(steps=args.dwq) if args.dwq else None)
    if args.dry_run:
        policy.explain(source, has_imatrix=imatrix is not None)
        return 0
    check_output_path(args.dst, directory=bool(args.hf) or not args.dst.endswith(".gguf"))  # before the work
    progress = False if args.no_progress else None
    _persistent_compilation_cache()
    start = time.perf_counter()
    if args.hf:
        plan = save_quantized_hf(source, policy, args.dst, args.hf, imatrix, progress,
                                 log=lambda m: print(m, file=sys.stderr))
    elif args.dst.endswith(".gguf"):
        extra = imatrix_metadata(imatrix, args.imatrix) if imatrix is not None else None
        plan = write_quantized_gguf(source, policy, args.dst, imatrix, progress, metadata=extra)
    else:
        plan = save_quantized_checkpoint(source, policy, args.dst, imatrix, progress)
    nbytes = sum(c.nbytes for c in plan.choices)
    print(f"{args.dst}: {len(plan.choices)} tensors, {nbytes / 2**20:.2f} MiB, "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


# ---- imatrix ------------------------------------------------------------------------------------

def _imatrix_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("--file", required=True, metavar="TEXT", help="the calibration text")
    p.add_argument("-o", "--output", default="imatrix.gguf", metavar="FILE", help="where to write (imatrix.gguf)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512, as llama-imatrix)")
    p.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: all)")
    p.add_argument("--batch", type=int, default=1, help="chunks per device call (default 1)")


@command("imatrix", "importance matrix of a text, as llama-imatrix collects it (GGUF imatrix file)",
         _imatrix_arguments)
def imatrix(args: argparse.Namespace) -> int:
    from jaxquant.io.output import check_output_path
    from jaxquant.isq.imatrix import collect_imatrix, write_imatrix

    _check_eval_arguments(args)
    check_output_path(args.output)  # before the whole text is run, not after
    text = _read_text(args.file)
    im = collect_imatrix(_load_for_eval(args), text, n_ctx=args.ctx, n_chunks=args.chunks, batch=args.batch,
                         dataset=args.file)
    write_imatrix(im, args.output)
    print(f"{args.output}: {len(im.entries)} matrices, {im.chunk_count} chunks of {im.chunk_size} tokens",
          file=sys.stderr)
    return 0


# ---- error --------------------------------------------------------------------------------------

def _error_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("--top", type=int, default=None, help="show only the N worst tensors")


@command("error", "per-tensor quantization error of --isq/--policy (relative RMSE, imatrix-weighted, bpw), "
         "worst first", _error_arguments)
def error(args: argparse.Namespace) -> int:
    from jaxquant.eval.error import format_errors, tensor_errors
    from jaxquant.io import open_model

    if not (args.isq or args.policy):
        raise JaxquantError("give the quantization to measure: --isq MIX or --policy YAML")
    print(format_errors(tensor_errors(open_model(args.path), args.isq or args.policy, args.imatrix), args.top))
    return 0


# ---- sweep --------------------------------------------------------------------------------------

def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a sweep YAML (configs/sweeps/*.yaml)")
    p.add_argument("--out", help="output directory (default: the config's 'out')")


@command("sweep", "run a grid of ISQ policies: PPL, KLD, size, speed; CSV, markdown table and plot; resumes",
         _sweep_arguments)
def sweep(args: argparse.Namespace) -> int:
    from jaxquant.eval.sweep import compile_count, read_config, run_sweep

    cfg = read_config(args.config, args.out)
    rows = run_sweep(cfg)
    print(f"{len(rows)} variants, {compile_count()} compilations in this run; results in {cfg.out}/results.md, "
          "results.csv, plot.png")
    return 0


# ---- entry point --------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxquant", description="Quantized LLMs as pure JAX functions.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, arguments, _) in COMMANDS.items():
        arguments(sub.add_parser(name, help=help, description=help))
    args = parser.parse_args(argv)
    try:
        code = COMMANDS[args.command][2](args)
        sys.stdout.flush()  # a closed pipe shows here rather than at exit
        return code
    except BrokenPipeError:  # the reader went away (jaxquant inspect M | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error while exiting
        return 1
    except (JaxquantError, OSError) as e:  # OSError: the system refused (disk full, permissions, ...)
        print(f"jaxquant {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
