"""The CLI misused as a careless user would: every misuse ends with exit code 1 and one
``jaxquant X: error:`` line (no traceback, no hang, and before any long work); a closed pipe
ends quietly; a save killed midway leaves nothing that blocks the same command run again."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf_samples as gs
import numpy as np
import pytest
from time_limit import time_limit

from jaxquant.cli import main
from jaxquant.io import open_model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("cli")
    gs.write_tiny_llama(d / "m.gguf")
    (d / "text.txt").write_text("tok1 tok2 tok3 " * 400, encoding="utf-8")
    (d / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 50)
    (d / "not.gguf").write_bytes(b"hello world\n" * 10)
    (d / "dir.gguf").mkdir()
    (d / "file").write_bytes(b"x")
    (d / "empty").mkdir()
    os.mkfifo(d / "fifo")
    return {p.name: str(p) for p in d.iterdir()} | {"dir": str(d)}


# (argv with {name} placeholders, what the error line says)
MISUSES = [
    ("inspect /nonexistent/m.gguf", "no such file or directory"),
    ("inspect {not.gguf}", "wrong magic"),
    ("inspect {fifo}", "not a regular file"),
    ("inspect {empty}", "{empty}"),
    ("quantize {m.gguf} {dir}/missing/out.gguf --type Q8_0", "the directory {dir}/missing does not exist"),
    ("quantize {m.gguf} {dir}/missing/out --type Q8_0", "the directory {dir}/missing does not exist"),
    ("quantize {m.gguf} {dir.gguf} --type Q8_0", "exists and is a directory"),
    ("quantize {m.gguf} {file} --type Q8_0", "exists and is a file"),
    ("quantize {m.gguf} {dir}/out.gguf --type Q9_K", "unknown policy 'Q9_K'"),
    ("quantize /nonexistent.gguf {dir}/out.gguf --type Q8_0", "no such file or directory"),
    ("quantize {m.gguf} {dir}/out.gguf --type Q8_0 --imatrix /nonexistent.dat", "cannot open"),
    ("quantize {m.gguf} {dir}/out.gguf --type Q8_0 --imatrix {fifo}", "not a regular file"),
    ("quantize {m.gguf} {dir}/out.gguf --type Q8_0 --imatrix {text.txt}", "truncated legacy imatrix"),
    ("quantize {m.gguf} {dir}/out.gguf --policy /nonexistent.yaml", "unknown policy"),
    ("imatrix {m.gguf} --file {text.txt} -o {dir}/missing/im.gguf", "the directory {dir}/missing does not exist"),
    ("imatrix {m.gguf} --file {latin1.txt} -o {dir}/im.gguf", "not UTF-8 text (invalid continuation byte at byte 3)"),
    ("imatrix {m.gguf} --file /nonexistent.txt -o {dir}/im.gguf", "cannot read the text file"),
    ("imatrix {m.gguf} --file {text.txt} --batch 0", "batch=0: must be >= 1"),
    ("perplexity {m.gguf} --file {latin1.txt}", "not UTF-8 text"),
    ("perplexity {m.gguf} --file {text.txt} --batch 0", "batch=0: must be >= 1"),
    ("perplexity {m.gguf} --file {text.txt} --batch -2", "batch=-2: must be >= 1"),
    ("perplexity {m.gguf} --file {text.txt} --chunks 0", "n_chunks=0 selects no chunk"),
    ("perplexity {m.gguf} --file {text.txt} --ctx 7", "n_ctx=7: must be an even number >= 4"),
    ("perplexity {m.gguf} --file {dir}", "cannot read the text file"),
    ("kld {m.gguf} --base /nonexistent.kld", "/nonexistent.kld"),
    ("kld {m.gguf} --base {dir}/b.kld --file {text.txt} --chunks 0", "n_chunks=0 selects no chunk"),
    ("kld {m.gguf} --base {dir}/b.kld --file {text.txt} --batch 0", "batch=0: must be >= 1"),
    ("generate {m.gguf} --prompt x --temperature -1", "temperature"),
    ("generate {m.gguf} --prompt x --top-p 2", "top_p"),
    ("generate {m.gguf} --prompt", None),  # argparse: a missing value (exit code 2, its own usage line)
    ("generate /nonexistent.gguf --prompt x", "no such file or directory"),
    ("error {m.gguf}", "give the quantization to measure"),
    ("sweep /nonexistent.yaml", "/nonexistent.yaml"),
]


def _fill(text: str, files: dict[str, str]) -> str:
    for name, path in files.items():
        text = text.replace("{" + name + "}", path)
    return text


@pytest.mark.parametrize("argv,message", MISUSES, ids=[f"{i:02d}-{m[0].split()[0]}" for i, m in enumerate(MISUSES)])
def test_misuse_gives_one_error_line(files, capsys, argv, message):
    args = [_fill(a, files) for a in argv.split()]
    command = args[0]
    with time_limit(60):  # opening the FIFO would block
        try:
            code = main(args)
        except SystemExit as e:  # argparse
            code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if message is None:
        assert code == 2 and f"jaxquant {command}: error:" in err.splitlines()[-1], err
        return
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"jaxquant {command}: error: "), err
    assert _fill(message, files).lower() in lines[0].lower(), lines[0]


def _cli(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "jaxquant.cli", *args], env=env, **kwargs)


def test_a_closed_pipe_ends_quietly(files):
    """``jaxquant inspect M | head``: the reader is gone before the first write."""
    r, w = os.pipe()
    os.close(r)
    proc = _cli("inspect", files["m.gguf"], stdout=w, stderr=subprocess.PIPE, text=True)
    os.close(w)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err == "", err


# ---- kills during a save, then the same command again --------------------------------------------------

def _big_llama(path: Path) -> None:
    """An F32 llama of 4 layers (~22 MB): its quantization takes long enough to be killed midway."""
    rng = np.random.default_rng(0)
    tensors = {}
    shapes = {"attn_norm": (512,), "attn_q": (512, 512), "attn_k": (256, 512), "attn_v": (256, 512),
              "attn_output": (512, 512), "ffn_norm": (512,), "ffn_gate": (1024, 512), "ffn_up": (1024, 512),
              "ffn_down": (512, 1024)}
    for name, shape in [("token_embd.weight", (32, 512)), ("output_norm.weight", (512,))] + \
            [(f"blk.{i}.{k}.weight", s) for i in range(4) for k, s in shapes.items()]:
        tensors[name] = ("F32", shape, (rng.standard_normal(shape) * 0.05).astype(np.float32).view(np.uint8).ravel())
    from gguf import GGUFValueType as V

    meta = {"llama.embedding_length": (512, V.UINT32, None), "llama.block_count": (4, V.UINT32, None),
            "llama.feed_forward_length": (1024, V.UINT32, None)}
    gs.write_sample(path, tensors, metadata=meta)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.002)
    pytest.fail(f"the command ended (exit {proc.poll()}) before it could be killed midway")


def _writing(pid: int, folder: Path) -> bool:
    """Whether the process holds a file in ``folder`` open (the unnamed file being written)."""
    fds = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        return any(os.readlink(fd).startswith(f"{folder}/") for fd in fds.iterdir())
    return False


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gguf", "orbax"])
def test_a_killed_save_leaves_nothing_and_the_same_command_succeeds(tmp_path, kind):
    src, out = tmp_path / "src" / "m.gguf", tmp_path / "out"
    src.parent.mkdir()
    out.mkdir()
    _big_llama(src)
    dst = out / ("m-q8.gguf" if kind == "gguf" else "m-q8")
    args = ["quantize", str(src), str(dst), "--type", "Q8_0", "--no-progress"]
    env = {"JAXQUANT_CACHE": str(tmp_path / "cache")}
    proc = _cli(*args, stderr=subprocess.DEVNULL, env=env)
    if kind == "gguf":
        _kill_when(proc, lambda: _writing(proc.pid, out))
        assert list(out.iterdir()) == []  # the unnamed file went with the process
    else:
        _kill_when(proc, lambda: dst.is_dir() and any(".orbax-checkpoint-tmp" in p.name for p in dst.iterdir()))
        assert all(".orbax-checkpoint-tmp" in p.name for p in dst.iterdir())
    again = _cli(*args, stderr=subprocess.PIPE, text=True, env=env)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert sorted(p.name for p in out.iterdir()) == [dst.name]
    if kind == "orbax":
        assert [p.name for p in dst.iterdir() if "tmp" in p.name] == []
    back = open_model(dst)
    assert len(back.tensor_names) == 2 + 4 * 9 and back.info("blk.3.ffn_down.weight").type == "Q8_0"
