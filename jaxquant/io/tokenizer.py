"""Tokenizers: llama.cpp-exact from GGUF metadata, or a Hugging Face ``tokenizer.json`` via ``tokenizers``.

``from_gguf`` reproduces llama.cpp's vocab loader and tokenizer (src/llama-vocab.cpp of the
reference tree) for SentencePiece-style ``llama`` and BPE ``gpt2`` vocabularies: the same token
attributes, special tokens split out first (tokenizer_st_partition), the same merges, the same
detokenizer. ``from_hf`` wraps the ``tokenizers`` library. Both render chat templates with a
sandboxed jinja2 environment set up as transformers does.
"""

from __future__ import annotations

import abc
import functools
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from jaxquant.errors import FileFormatError, JaxquantError
from jaxquant.io import tokenizer_bpe as bpe
from jaxquant.io import tokenizer_spm as spm

# llama_token_attr bits (include/llama.h) and the GGUF token_type -> attr map of the vocab loader.
UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = (1 << i for i in range(6))
LSTRIP, RSTRIP = 1 << 7, 1 << 8
_TYPE_ATTR = {1: NORMAL, 2: UNKNOWN, 3: CONTROL, 4: USER_DEFINED, 5: UNUSED, 6: BYTE}  # others: undefined (0)
_SPECIAL = UNKNOWN | CONTROL

# Token texts llama.cpp forces to control / end-of-generation by name (llama_vocab::impl::load).
_EOG_NAMES = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~["])
_FIM_NAMES = {  # key suffix -> candidate texts; the first one found becomes control when the key is absent
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_FIM_DEPRECATED = {"fim_pre": "prefix", "fim_suf": "suffix", "fim_mid": "middle"}
_ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss
_C_SPACE = " \t\n\v\f\r"  # C isspace()
_BPE_CACHE_WORDS = 1 << 16


class Tokenizer(abc.ABC):
    """Text <-> token ids, plus the model's chat template."""

    bos_id: int | None
    eos_id: int | None
    add_bos: bool  # whether encode() prepends BOS by default
    add_eos: bool
    chat_template: str | None
    fim_eog_ids: frozenset[int] = frozenset()  # FIM tokens that end generation (GGUF vocabularies)

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of tokens, added/special ones included."""

    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``.

        ``add_bos=None`` adds what the model asks for (BOS if ``self.add_bos``, EOS if ``self.add_eos``),
        ``True`` forces BOS (and still adds EOS if asked for), ``False`` adds nothing. With
        ``parse_special`` the texts of control tokens (``<start_of_turn>`` ...) in ``text`` become those
        tokens; user-defined tokens are always split out.
        """

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``; control tokens render as nothing when ``skip_special``."""

    @abc.abstractmethod
    def token_to_piece(self, token: int, special: bool = True) -> bytes:
        """The bytes one token stands for (a byte token may be part of a UTF-8 character)."""

    @abc.abstractmethod
    def token_text(self, token: int) -> str:
        """The token's entry in the vocabulary, as stored (``▁Hello``, ``<bos>``, ``<0x0A>``)."""

    @functools.cached_property
    def eog_ids(self) -> frozenset[int]:
        """End-of-generation tokens: EOS, the special tokens that llama.cpp ends generation on by
        their text (``<end_of_turn>``, ``<|eot_id|>``, ``<|im_end|>``, ...) where the vocabulary has them,
        and a GGUF vocabulary's FIM pad / repo / file-separator tokens."""
        found = ({self.eos_id} - {None}) | self.fim_eog_ids
        for text in _EOG_NAMES:
            ids = self.encode(text, add_bos=False, parse_special=True)
            if len(ids) == 1 and self.token_text(ids[0]) == text:
                found.add(ids[0])
        return frozenset(found)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the model's jinja2 chat template.

        The template sees ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and any
        extra ``kwargs`` (``tools=...``), with transformers' ``raise_exception``, ``strftime_now`` and
        ``tojson``.
        """
        template = self._compiled_template()
        special = {name: self.token_text(tid) for name, tid in (("bos_token", self.bos_id),
                                                                 ("eos_token", self.eos_id)) if tid is not None}
        try:
            return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                   **special, **kwargs)
        except jinja2.TemplateError as e:
            raise JaxquantError(f"chat template failed: {e}") from e

    def _compiled_template(self) -> jinja2.Template:
        if not self.chat_template:
            raise JaxquantError("this tokenizer has no chat template (GGUF key tokenizer.chat_template, or "
                                "chat_template in tokenizer_config.json / chat_template.jinja)")
        return _compile_template(self.chat_template)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask markers) renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[Any]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    """A chat template compiled the way transformers compiles it (sandboxed, trimmed blocks)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise JaxquantError(f"chat template does not compile: {e}") from e


# ------------------------------------------------------------------------------------------------ GGUF


def _require(metadata: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = metadata.get(key)
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        what = "missing" if value is None else f"a {type(value).__name__}, expected {expected}"
        raise FileFormatError(f"tokenizer metadata: {key} is {what}")
    return value


class GGUFTokenizer(Tokenizer):
    """llama.cpp's tokenizer for a ``llama`` (SentencePiece) or ``gpt2`` (BPE) GGUF vocabulary."""

    def __init__(self, metadata: Mapping[str, Any]):
        model = _require(metadata, "tokenizer.ggml.model", str)
        self.tokens = list(_require(metadata, "tokenizer.ggml.tokens", (list, tuple)))
        n = len(self.tokens)
        if (bad := next((i for i, t in enumerate(self.tokens) if not isinstance(t, str)), None)) is not None:
            raise FileFormatError(f"tokenizer metadata: token {bad} ({self.tokens[bad]!r}) is not a UTF-8 string")
        self.tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(self.tokens)]
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}
        if len(self.token_to_id) != n:
            dup = next(t for i, t in enumerate(self.tokens) if self.token_to_id[t] != i)
            raise FileFormatError(f"tokenizer metadata: tokenizer.ggml.tokens holds {dup!r} twice")
        self.scores = [float(s) for s in metadata.get("tokenizer.ggml.scores", [0.0] * n)]
        types = metadata.get("tokenizer.ggml.token_type", [1] * n)
        if len(self.scores) < n or len(types) < n:
            raise FileFormatError(f"tokenizer metadata: fewer scores/token types than the {n} tokens")
        self.attrs = [_TYPE_ATTR.get(int(t), 0) for t in types[:n]]

        if model == "llama":
            self.is_spm, self.pre = True, None
            bos, eos = 1, 2
            self.add_space_prefix, self.clean_spaces, self.add_bos = True, False, True
        elif model == "gpt2":
            self.is_spm = False
            pre_name = metadata.get("tokenizer.ggml.pre") or "default"
            if pre_name not in bpe.PRE_TOKENIZERS:
                raise FileFormatError(f"tokenizer metadata: tokenizer.ggml.pre = {pre_name!r} is not supported "
                                      f"(supported: {', '.join(sorted(bpe.PRE_TOKENIZERS))})")
            self.pre = bpe.PRE_TOKENIZERS[pre_name]
            merges = _require(metadata, "tokenizer.ggml.merges", (list, tuple))
            self.ranks: dict[tuple[str, str], int] = {}
            for rank, merge in enumerate(merges):
                cut = merge.find(" ", 1)
                self.ranks.setdefault((merge[:cut], merge[cut + 1:]) if cut != -1 else ("", ""), rank)
            bos = eos = 11
            self.add_space_prefix, self.clean_spaces, self.add_bos = False, self.pre.clean_spaces, self.pre.add_bos
            self._word_cache: dict[str, tuple[int, ...]] = {}
        else:
            raise FileFormatError(f"tokenizer metadata: tokenizer.ggml.model = {model!r} is not supported "
                                  "(only 'llama' SentencePiece and 'gpt2' BPE vocabularies)")
        self.add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", self.add_space_prefix))
        self.bos_id = self._special_id(metadata, "bos", bos)
        self.eos_id = self._special_id(metadata, "eos", eos)
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", self.add_bos))
        self.add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        self.chat_template = metadata.get("tokenizer.chat_template")
        self._mark_special_tokens(metadata)
        # Special tokens are split out longest first (std::sort by length; ties here by id).
        self._special = sorted((i for i, a in enumerate(self.attrs) if a & (CONTROL | USER_DEFINED | UNKNOWN)),
                               key=lambda i: (-len(self.tokens[i].encode("utf-8")), i))

    def _special_id(self, metadata: Mapping[str, Any], name: str, default: int | None) -> int | None:
        """A special token id: the GGUF key if present and in range, else llama.cpp's default."""
        n = len(self.tokens)
        if default is not None and default >= n:
            default = None
        for key in (name, _FIM_DEPRECATED.get(name)):
            value = metadata.get(f"tokenizer.ggml.{key}_token_id") if key else None
            if isinstance(value, int) and 0 <= value < n:
                default = value
        return default

    def _mark_special_tokens(self, metadata: Mapping[str, Any]) -> None:
        """The attribute fixes llama.cpp's loader applies by token text and model name."""
        ids, attrs = self.token_to_id, self.attrs
        fim = {}  # name -> id, from its key or found by text
        for name, candidates in _FIM_NAMES.items():
            fim[name] = self._special_id(metadata, name, None)
            if fim[name] is None:
                found = sorted(ids[c] for c in candidates if c in ids)
                if found:
                    attrs[found[0]] |= CONTROL
                    fim[name] = found[0]
        # llama.cpp also ends generation on the FIM pad, repo and file-separator tokens.
        self.fim_eog_ids = frozenset(fim[n] for n in ("fim_pad", "fim_rep", "fim_sep") if fim[n] is not None)
        for text in _EOG_NAMES & ids.keys():
            attrs[ids[text]] |= CONTROL
        for text in _ALWAYS_USER_DEFINED:
            if text in ids:
                attrs[ids[text]] = USER_DEFINED

        def has(*texts: str) -> bool:  # all of these texts are end-of-generation ones
            return any(t in ids for t in texts)

        if has("<|end|>") and has("<|call|>", "<|calls|>") and has("<|return|>", "<|flush|>"):
            attrs[ids["<|end|>"]] = USER_DEFINED
        eos_text = self.tokens[self.eos_id] if self.eos_id is not None else None
        if has("</s>") and (has("<|tool_response>") or eos_text == "<|plamo:eos|>"):
            attrs[ids["</s>"]] = NORMAL
        # Per-model strip attributes (the end of llama_vocab::impl::load).
        name = str(metadata.get("general.name", "")).lower()
        pre, arch = str(metadata.get("tokenizer.ggml.pre", "")), str(metadata.get("general.architecture", ""))
        if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
                any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3")):
            self._set_attr("<mask>", LSTRIP, True)
        elif "phi-3" in name or "phi3" in name:
            for i, a in enumerate(attrs):
                if a & (CONTROL | USER_DEFINED | UNKNOWN):
                    attrs[i] |= RSTRIP
            self._set_attr("</s>", RSTRIP, True)
            for text in ("<unk>", "<s>", "<|endoftext|>"):
                self._set_attr(text, RSTRIP, False)
        elif "modern-bert" in name:
            self._set_attr("[MASK]", LSTRIP, True)

    def _set_attr(self, text: str, bit: int, value: bool) -> None:
        if text in self.token_to_id:
            i = self.token_to_id[text]
            self.attrs[i] = self.attrs[i] | bit if value else self.attrs[i] & ~bit

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_text(self, token: int) -> str:
        return self.tokens[token]

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """tokenizer_st_partition: special tokens split out of the text, longest first, as token ids."""
        fragments: list[str | int] = [text] if text else []
        for tid in self._special:
            attr, special = self.attrs[tid], self.tokens[tid]
            if (not parse_special and attr & _SPECIAL) or special not in text:
                continue
            out: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or special not in frag:
                    out.append(frag)
                    continue
                pieces = frag.split(special)
                for k, piece in enumerate(pieces):
                    if k > 0 and attr & RSTRIP:
                        piece = piece.lstrip(_C_SPACE)
                    if k < len(pieces) - 1 and attr & LSTRIP:
                        piece = piece.rstrip(_C_SPACE)
                    if piece:
                        out.append(piece)
                    if k < len(pieces) - 1:
                        out.append(tid)
            fragments = out
        return fragments

    def byte_to_token(self, byte: int) -> int:
        """The <0xXX> token of a byte (SentencePiece byte fallback)."""
        token = self.token_to_id.get(f"<0x{byte:02X}>")
        if token is None and byte < 0x80:
            token = self.token_to_id.get(chr(byte))
        if token is None:
            raise JaxquantError(f"the vocabulary has no token for byte 0x{byte:02X} (byte fallback)")
        return token

    def _bpe_fragment(self, text: str) -> list[int]:
        out: list[int] = []
        for word in bpe.pre_split(text, self.pre.regexes):
            word = bpe.byte_encode(word)
            ids = self._word_cache.get(word)
            if ids is None:
                if self.pre.ignore_merges and word in self.token_to_id:
                    symbols = [word]
                else:
                    symbols = bpe.merge(word, self.ranks)
                ids = []
                for s in symbols:
                    if s in self.token_to_id:
                        ids.append(self.token_to_id[s])
                    else:  # llama.cpp looks each UTF-8 byte up as a one-byte text and drops misses
                        ids.extend(self.token_to_id[chr(b)] for b in s.encode("utf-8")
                                   if b < 0x80 and chr(b) in self.token_to_id)
                ids = tuple(ids)
                if len(self._word_cache) >= _BPE_CACHE_WORDS:
                    self._word_cache.clear()
                self._word_cache[word] = ids
            out.extend(ids)
        return out

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        _check_text(text)
        out: list[int] = []
        if add_bos or (add_bos is None and self.add_bos):
            if self.bos_id is None:
                raise JaxquantError("add_bos: this vocabulary has no BOS token")
            out.append(self.bos_id)
        prev_special = True  # SentencePiece: a fragment after a special token gets the space prefix
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
            elif self.is_spm:
                frag = (" " if self.add_space_prefix and prev_special else "") + frag
                out.extend(spm.tokenize(frag.replace(" ", "\u2581"), self.token_to_id, self.scores, self.byte_to_token))
                prev_special = False
            else:
                out.extend(self._bpe_fragment(frag))
        if add_bos is not False and self.add_eos:
            if self.eos_id is None:
                raise JaxquantError("add_eos: this vocabulary has no EOS token")
            out.append(self.eos_id)
        return out

    def token_to_piece(self, token: int, special: bool = True) -> bytes:
        if not 0 <= token < len(self.tokens):
            raise JaxquantError(f"token id {token} is outside the vocabulary of {len(self.tokens)}")
        attr, text = self.attrs[token], self.tokens[token]
        if attr & _SPECIAL and not special:
            return b""
        if attr & (_SPECIAL | USER_DEFINED):
            return text.encode("utf-8")
        if attr & NORMAL:
            if self.is_spm:
                return text.replace("\u2581", " ").encode("utf-8")
            return b"".join(_gpt2_char_to_bytes(ch, text) for ch in text)
        if attr & BYTE:
            return bytes([int(text[3:5], 16)])
        return b""

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """llama_detokenize(remove_special=False, unparse_special=not skip_special)."""
        text = bytearray()
        for k, token in enumerate(ids):
            piece = self.token_to_piece(token, special=not skip_special)
            if k == 0 and self.add_space_prefix and piece[:1] == b" ":
                piece = piece[1:]  # the space SentencePiece put before the first word
            text += piece
        if self.clean_spaces:
            text = _clean_spaces(text)
        return text.decode("utf-8", errors="replace")


def _check_text(text: str) -> None:
    """llama.cpp takes UTF-8 bytes: text with lone surrogates has none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise JaxquantError(f"cannot tokenize: {e.reason} at character {e.start} ({text[e.start]!r})") from None


def _gpt2_char_to_bytes(ch: str, token: str) -> bytes:
    """llama_decode_text for one character of a byte-level BPE token."""
    b = bpe.UNICODE_TO_BYTE.get(ch)
    if b is not None:
        return bytes([b])
    return b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + token.encode("utf-8") + b"]"


def _clean_spaces(t: bytearray) -> bytearray:
    """The three clean-up passes of llama_vocab::impl::detokenize, in place as in C."""
    n = len(t)
    total = 1 if n else 0  # 1: " ?" " !" " ." " ," lose the space
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    n, total, i = total, 1 if total else 0, 1  # 2: " ' " loses both spaces
    while i < n:
        x = t[i]
        if x == 0x27 and i + 1 < n and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            total -= 1
            i += 1
            t[i] = 0
        t[total] = x
        total += 1
        i += 1
    n, total = total, 1 if total else 0  # 3: " 's" " 'm" " 're" " 've" lose the space
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = t[i + 1]
            if x1 in b"sm" or (x1 not in b"td" and i + 2 < n and (x1, t[i + 2]) in ((0x72, 0x65), (0x76, 0x65))):
                total -= 1
        t[total] = x
        total += 1
    return t[:total]


def from_gguf(metadata: Mapping[str, Any]) -> GGUFTokenizer:
    """The llama.cpp tokenizer described by a GGUF file's metadata (key -> value, arrays as lists)."""
    return GGUFTokenizer(metadata)


# ------------------------------------------------------------------------------------------------ HF


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` run by the ``tokenizers`` library."""

    def __init__(self, directory: str | Path):
        import tokenizers  # imported here so GGUF-only users do not need it

        path = Path(directory)
        if not (path / "tokenizer.json").is_file():
            raise FileFormatError(f"{path}: no tokenizer.json")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            config = json.loads((path / "tokenizer_config.json").read_text()) \
                if (path / "tokenizer_config.json").is_file() else {}
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise FileFormatError(f"{path}: cannot read the tokenizer: {e}") from e
        ids = {name: self._tok.token_to_id(text) if (text := _token_content(config.get(name))) else None
               for name in ("bos_token", "eos_token")}
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        self._byte_level = isinstance(self._tok.decoder, tokenizers.decoders.ByteLevel)
        self._added = self._tok.get_added_tokens_decoder()  # id -> AddedToken
        # Default BOS: tokenizer_config.json's add_bos_token, else whatever the post-processor adds.
        post_bos = self.bos_id is not None and self._tok.encode("", add_special_tokens=True).ids[:1] == [self.bos_id]
        self.add_bos = bool(config.get("add_bos_token", post_bos))
        self.add_eos = bool(config.get("add_eos_token", False))
        self.chat_template = self._find_template(path, config)

    @staticmethod
    def _find_template(path: Path, config: Mapping[str, Any]) -> str | None:
        if (path / "chat_template.jinja").is_file():
            return (path / "chat_template.jinja").read_text()
        template = config.get("chat_template")
        if template is None and (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        return template if isinstance(template, str) else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_text(self, token: int) -> str:
        return self._tok.id_to_token(token)

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        _check_text(text)
        self._tok.encode_special_tokens = not parse_special
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (add_bos or (add_bos is None and self.add_bos)) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_bos is not False and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_piece(self, token: int, special: bool = True) -> bytes:
        """Added tokens as written, byte-level BPE tokens through GPT-2's byte table, SentencePiece
        tokens with U+2581 as space and <0xXX> as the byte."""
        text = self._tok.id_to_token(token)
        if text is None:
            raise JaxquantError(f"token id {token} is outside the vocabulary of {self.vocab_size}")
        if token in self._added:
            return b"" if self._added[token].special and not special else text.encode("utf-8")
        if self._byte_level:
            return b"".join(_gpt2_char_to_bytes(ch, text) for ch in text)
        if (m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", text)) is not None:
            return bytes([int(m.group(1), 16)])
        return text.replace("\u2581", " ").encode("utf-8")


def from_hf(directory: str | Path) -> HFTokenizer:
    """The tokenizer of a Hugging Face checkpoint directory (tokenizer.json + tokenizer_config.json)."""
    return HFTokenizer(directory)
