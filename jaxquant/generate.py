"""Text generation: prefill and decode in one jit-compiled on-device loop, with sampling.

A batch of prompts of different lengths is right-padded; each token sits at its own position
(padding at -1), so every row decodes on from its own length. The loop state (KV cache, the
tokens generated so far, per-row counters) is allocated once at full size and donated to the one
device call that prefills the prompts and runs the decode loop (``lax.while_loop``) until every
row has stopped.

Streaming stays inside that call: each step hands its tokens to the host through
``jax.debug.callback``. Each decode step multiplies by the packed weights (``ops.qdot``); an
optimization barrier keeps XLA from hoisting their dequantization out of the loop, which would
hold a float32 copy of every weight for the call and read 4 bytes per weight per step
(benchmarks/RESULTS.md, "Decode on the CPU vs llama.cpp").
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import itertools
import math
import queue
import threading
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import models, sharding
from jaxquant.config import ModelConfig
from jaxquant.errors import JaxquantError
from jaxquant.model import Model

DEFAULT_MAX_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits.

    ``temperature`` 0 is greedy (argmax). Otherwise the logits are divided by the temperature and
    filtered in transformers' order: ``top_k`` keeps the k largest (0: off), ``top_p`` the most
    likely tokens until their probability reaches top_p (1: off), ``min_p`` drops tokens less
    likely than min_p times the most likely one (0: off); the next token is drawn from the rest.
    Bad values raise JaxquantError here, before anything compiles.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        def real(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not (lo < value if lo_open else lo <= value) or not value <= hi:
                interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
                raise JaxquantError(f"sampling: {name}={value!r} must be a number in {interval}")

        real("temperature", 0.0, math.inf)
        real("top_p", 0.0, 1.0, lo_open=True)
        real("min_p", 0.0, 1.0)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise JaxquantError(f"sampling: top_k={self.top_k!r} must be an integer >= 0 (0: off)")
        if not math.isfinite(self.temperature):
            raise JaxquantError(f"sampling: temperature={self.temperature!r} must be finite")

    @property
    def spec(self) -> tuple[bool, int, bool, bool]:
        """The static part (greedy, top_k, top_p on, min_p on): it shapes the compiled program."""
        return self.temperature == 0, int(self.top_k), self.top_p < 1, self.min_p > 0

    @property
    def values(self) -> np.ndarray:
        """The traced part (temperature, top_p, min_p): changing it does not recompile."""
        return np.array([self.temperature or 1.0, self.top_p, self.min_p], np.float32)


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """float32 logits [..., V] -> the logits sampling draws from: divided by the temperature,
    -inf where top-k, top-p or min-p exclude a token. Not for greedy (temperature 0)."""
    return _filter(jnp.asarray(logits, jnp.float32), jnp.asarray(sampling.values), sampling.spec)


def _filter(logits: jax.Array, values: jax.Array, spec: tuple[bool, int, bool, bool]) -> jax.Array:
    _, top_k, use_top_p, use_min_p = spec
    x = logits / values[0]
    top_k = top_k if 0 < top_k < x.shape[-1] else 0
    if top_k:
        top = jax.lax.top_k(x, top_k)[0]  # descending
        x = jnp.where(x < top[..., -1:], -jnp.inf, x)
    if use_top_p:
        ranked = top if top_k else -jnp.sort(-x, axis=-1)  # descending; the rest are -inf anyway
        p = jax.nn.softmax(ranked, axis=-1)
        keep = jnp.cumsum(p, axis=-1) - p < values[1]  # mass of the tokens before it; keeps the first
        cut = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cut, -jnp.inf, x)
    if use_min_p:  # p < min_p * p_max  <=>  x < x_max + log(min_p)
        x = jnp.where(x < jnp.max(x, axis=-1, keepdims=True) + jnp.log(values[2]), -jnp.inf, x)
    return x


def _sample(logits: jax.Array, key: jax.Array, values: jax.Array, spec: tuple[bool, int, bool, bool]) -> jax.Array:
    """Next token ids [B] from float32 logits [B, V]."""
    if spec[0]:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, _filter(logits, values, spec), axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# The device loop


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["cache", "tokens", "count", "done", "nan", "step"], meta_fields=[])
@dataclasses.dataclass
class _State:
    """What the loop carries; donated from call to call."""

    cache: models.KVCache
    tokens: jax.Array  # [B, N] int32: the tokens generated so far, -1 after each row's count
    count: jax.Array  # [B] int32: tokens generated per row (a stop token included)
    done: jax.Array  # [B] bool: the row has stopped (stop token, its limit, or NaN logits)
    nan: jax.Array  # [B] bool: the row stopped on NaN logits (a broken model): the host raises
    step: jax.Array  # [] int32: model calls so far (0: the prompts are not prefilled yet)


def _init_state(cfg: ModelConfig, batch: int, max_len: int, max_new: int, dtype, cache_sharding) -> _State:
    return _State(models.init_cache(cfg, batch, max_len, dtype, cache_sharding), jnp.full((batch, max_new), -1, jnp.int32),
                  jnp.zeros(batch, jnp.int32), jnp.zeros(batch, bool), jnp.zeros(batch, bool), jnp.zeros((), jnp.int32))


# Streaming: the loop hands every step's tokens to the host through a callback, to the queue of
# its generation's channel (a traced id, so one compiled program serves every generation).
_CHANNELS: dict[int, queue.SimpleQueue] = {}
_channel_ids = itertools.count()


def _emit(channel: np.ndarray, token: np.ndarray, live: np.ndarray, nan: np.ndarray) -> None:
    events = _CHANNELS.get(int(channel))
    if events is not None:  # None: the consumer has stopped listening; the loop runs to its end
        events.put((np.asarray(token), np.asarray(live), np.asarray(nan)))


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "stream"), donate_argnames=("state",))
def _run(params: models.Params, state: _State, prompts: jax.Array, lengths: jax.Array, limits: jax.Array,
         stop_ids: jax.Array, key: jax.Array, values: jax.Array, channel: jax.Array, *, cfg: ModelConfig,
         spec: tuple[bool, int, bool, bool], stream: bool) -> _State:
    """Prefill, then decode until every row is done. prompts [B, T] right-padded, lengths [B],
    limits [B] (most new tokens per row). With ``stream`` each step's tokens go to ``_emit``."""
    rows = jnp.arange(prompts.shape[0])

    def record(state: _State, cache: models.KVCache, logits: jax.Array) -> _State:
        token = _sample(logits, jax.random.fold_in(key, state.step), values, spec)
        live = ~state.done
        nan = live & jnp.isnan(logits).any(axis=-1)  # its token is meaningless: the row stops, the host raises
        if stream:
            jax.debug.callback(_emit, channel, token, live, nan, ordered=True)
        slot = jnp.where(live & ~nan, state.count, state.tokens.shape[1])  # finished rows write nothing
        tokens = state.tokens.at[rows, slot].set(token, mode="drop")
        count = state.count + (live & ~nan)
        stopped = jnp.any(token[:, None] == stop_ids, axis=-1) | (count >= limits) | nan
        return _State(cache, tokens, count, state.done | (live & stopped), state.nan | nan, state.step + 1)

    def prefill(state: _State) -> _State:
        t = jnp.arange(prompts.shape[1])
        positions = jnp.where(t < lengths[:, None], t, -1)
        x, cache = models.hidden_states(params, prompts, positions, state.cache, cfg)
        last = x[rows, lengths - 1]  # [B, E]: only each prompt's last token needs logits
        return record(state, cache, models.logits(params, last, cfg))

    def decode(state: _State) -> _State:
        token = state.tokens[rows, state.count - 1]
        position = jnp.where(state.done, -1, lengths + state.count - 1)  # finished rows write no K/V
        p = jax.lax.optimization_barrier(params)  # qdot on the packed bytes each step (module docstring)
        x, cache = models.hidden_states(p, token[:, None], position[:, None], state.cache, cfg)
        return record(state, cache, models.logits(p, x[:, 0], cfg))

    return jax.lax.while_loop(lambda s: ~jnp.all(s.done), decode, prefill(state))


# ---------------------------------------------------------------------------------------------
# Host side


def _bucket(n: int) -> int:
    """Shapes are rounded up to powers of two (at least 16) so that nearby sizes share a program."""
    return max(16, 1 << (n - 1).bit_length())


def _check_prompts(model: Model, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise JaxquantError(f"max_tokens={max_tokens!r} must be an integer >= 1")
    if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise JaxquantError("prompts must be a non-empty list of token id lists")
    vocab, context = model.cfg.vocab_size, model.cfg.context_length
    out = []
    for i, prompt in enumerate(prompts):
        ids = [int(t) for t in prompt]
        if not ids:
            raise JaxquantError(f"prompt {i} is empty")
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise JaxquantError(f"prompt {i} holds token id(s) {bad[:5]} outside the vocabulary of {vocab}")
        if context and len(ids) >= context:
            raise JaxquantError(f"prompt {i} has {len(ids)} tokens; the model's context is {context} tokens "
                                "(the prompt and at least one new token must fit)")
        out.append(ids)
    return out


def _stop_ids(model: Model, stop: Sequence[int]) -> np.ndarray:
    """End-of-generation ids (config, tokenizer) and ``stop``, padded with -1 to a multiple of 8."""
    vocab = model.cfg.vocab_size
    if bad := [s for s in stop if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < vocab]:
        raise JaxquantError(f"stop ids {bad[:5]} are not token ids of the vocabulary of {vocab}")
    ids = set(model.cfg.eos_ids) | set(model.tokenizer.eog_ids if model.tokenizer else ()) | {int(s) for s in stop}
    out = np.full(-(-max(len(ids), 1) // 8) * 8, -1, np.int32)
    out[:len(ids)] = sorted(ids)
    return out


def _prepare(model: Model, prompts: Sequence[Sequence[int]], max_tokens: int, sampling: Sampling, seed: int,
             stop: Sequence[int], channel: int | None) -> tuple[functools.partial, np.ndarray]:
    """Check the input and allocate the state: the device loop ready to run, and the stop ids."""
    prompts = _check_prompts(model, prompts, max_tokens)
    stop_ids = _stop_ids(model, stop)
    if not isinstance(sampling, Sampling):
        raise JaxquantError(f"sampling must be a jaxquant.Sampling, not {type(sampling).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise JaxquantError(f"seed={seed!r} must be an integer")
    lengths = np.array([len(p) for p in prompts], np.int32)
    max_len = _bucket(int(lengths.max()) + max_tokens)
    if model.cfg.context_length:
        max_len = min(max_len, model.cfg.context_length)
    padded = np.zeros((len(prompts), min(_bucket(int(lengths.max())), max_len)), np.int32)
    for row, p in zip(padded, prompts):
        row[:len(p)] = p
    limits = np.minimum(max_tokens, max_len - lengths)
    state = _init_state(model.cfg, len(prompts), max_len, _bucket(max_tokens), model.compute_dtype,
                        sharding.cache_sharding(model.params, model.cfg))
    run = functools.partial(_run, model.params, state, padded, lengths, limits, stop_ids, jax.random.key(seed),
                            sampling.values, np.int32(-1 if channel is None else channel), cfg=model.cfg,
                            spec=sampling.spec, stream=channel is not None)
    return run, stop_ids


def generate_tokens(model: Model, prompts: Sequence[Sequence[int]], *, max_tokens: int = DEFAULT_MAX_TOKENS,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                    seed: int = 0, stop: Sequence[int] = ()) -> list[list[int]]:
    """The new token ids of each prompt (a batch of token-id lists), in one device call.

    A row stops after ``max_tokens`` tokens, at the end of the context, or on an end-of-generation
    token (the config's EOS, the tokenizer's end-of-turn tokens, ``stop``), which is left out. See
    ``Sampling`` for the sampling parameters.
    """
    sampling = Sampling(temperature, top_k, top_p, min_p)
    run, stop_ids = _prepare(model, prompts, max_tokens, sampling, seed, stop, channel=None)
    state = run()
    tokens, count, nan = jax.device_get((state.tokens, state.count, state.nan))
    if nan.any():
        raise _nan_error(np.flatnonzero(nan).tolist(), count[nan].tolist())
    return [[int(t) for t in row[:n] if t not in stop_ids] for row, n in zip(tokens, count)]


def stream_tokens(model: Model, prompts: Sequence[Sequence[int]], *, max_tokens: int = DEFAULT_MAX_TOKENS,
                  sampling: Sampling = Sampling(), seed: int = 0, stop: Sequence[int] = ()
                  ) -> Iterator[list[list[int]]]:
    """``generate_tokens`` that yields as the device loop runs: after every step, each row's new
    token ([token], or [] for a row that has stopped). Still one device call: the loop hands each
    step's tokens to the host through a callback. Bad input raises here, not at the first step."""
    channel = next(_channel_ids)
    run, stop_ids = _prepare(model, prompts, max_tokens, sampling, seed, stop, channel)
    return _stream_events(run, stop_ids, channel)


def _stream_events(run: functools.partial, stop_ids: np.ndarray, channel: int) -> Iterator[list[list[int]]]:
    events: queue.SimpleQueue = queue.SimpleQueue()
    _CHANNELS[channel] = events
    try:
        # The device loop runs in another thread (a call may block until it is done) while this one
        # yields; a sentinel marks its end, or its error.
        threading.Thread(target=_run_to_end, args=(run, events), daemon=True).start()
        while (event := events.get()) is not None:
            if isinstance(event, BaseException):
                raise event
            token, live, nan = event
            if nan.any():
                raise _nan_error(np.flatnonzero(nan).tolist())
            yield [[int(t)] if alive and t not in stop_ids else [] for t, alive in zip(token, live)]
    finally:
        del _CHANNELS[channel]


def _nan_error(rows: list[int], counts: list[int] | None = None) -> JaxquantError:
    at = f" after {counts} new tokens" if counts is not None else ""
    return JaxquantError(f"the model's logits are NaN for prompt(s) {rows}{at}: its weights or config hold NaN/Inf "
                         "or overflow (check the file, e.g. with jaxquant inspect, or load it with dtype float32)")


def _run_to_end(run: functools.partial, events: queue.SimpleQueue) -> None:
    try:
        jax.block_until_ready(run())
        events.put(None)
    except BaseException as e:  # handed to the consumer, which raises it
        events.put(e)


def encode_prompts(model: Model, prompts: Sequence[str], chat: bool = False) -> list[list[int]]:
    """Token ids of text prompts; with ``chat`` each is a user message in the model's chat template."""
    if model.tokenizer is None:
        raise JaxquantError("this model has no tokenizer; pass token ids to generate_tokens")
    if isinstance(prompts, str) or len(prompts) == 0:
        raise JaxquantError("prompts must be a non-empty list of strings")
    out = []
    for i, text in enumerate(prompts):
        if not isinstance(text, str) or not text:
            raise JaxquantError(f"prompt {i} is {'empty' if text == '' else f'not a string: {text!r}'}")
        if chat:
            text = model.tokenizer.apply_chat_template([{"role": "user", "content": text}])
            out.append(model.tokenizer.encode(text, add_bos=False, parse_special=True))
        else:
            out.append(model.tokenizer.encode(text))
    return out


def _pieces(model: Model, tokens: Sequence[int]) -> bytes:
    """The bytes of generated tokens as llama.cpp streams them (special tokens render as nothing)."""
    return b"".join(model.tokenizer.token_to_piece(t, special=False) for t in tokens)


def stream(model: Model, prompts: Sequence[str], *, max_tokens: int = DEFAULT_MAX_TOKENS,
           sampling: Sampling = Sampling(), seed: int = 0, stop: Sequence[int] = (), chat: bool = False
           ) -> Iterator[list[str]]:
    """``stream_tokens`` for text prompts: yields each row's new text after every step (a UTF-8
    character split across tokens comes out whole, with its last token). Bad input raises here."""
    ids = encode_prompts(model, prompts, chat)
    steps = stream_tokens(model, ids, max_tokens=max_tokens, sampling=sampling, seed=seed, stop=stop)
    return _texts(model, steps, len(ids))


def _texts(model: Model, steps: Iterator[list[list[int]]], rows: int) -> Iterator[list[str]]:
    decoders = [codecs.getincrementaldecoder("utf-8")("replace") for _ in range(rows)]
    for new in steps:
        yield [d.decode(_pieces(model, tokens)) for d, tokens in zip(decoders, new)]
    if any(tail := [d.decode(b"", final=True) for d in decoders]):  # a character cut off at the end
        yield tail


def generate(model: Model, prompts: str | Sequence[str], *, max_tokens: int = DEFAULT_MAX_TOKENS,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int = 0,
             stop: Sequence[int] = (), chat: bool = False) -> list[str]:
    """The generated text of each prompt (one string or a list), all rows in one batch and one
    device call. ``chat`` wraps each prompt as a user message in the model's chat template;
    ``stop`` adds stop token ids to the model's end-of-generation tokens; see ``Sampling``."""
    ids = encode_prompts(model, [prompts] if isinstance(prompts, str) else prompts, chat)
    out = generate_tokens(model, ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          min_p=min_p, seed=seed, stop=stop)
    return [_pieces(model, tokens).decode("utf-8", "replace") for tokens in out]
