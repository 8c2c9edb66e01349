"""llama.cpp's BPE tokenizer (GGUF ``tokenizer.ggml.model = gpt2``), ported step for step.

A fragment of text is cut into words by the pre-tokenizer regexes that ``tokenizer.ggml.pre``
selects (llama.cpp's hand-written splitters where it has them, else its std::regex fallback on a
category-collapsed copy of the text), each word is byte-encoded GPT-2 style, and the pairs of
adjacent symbols are merged lowest merge rank first. Source: src/llama-vocab.cpp
(llm_tokenizer_bpe*) and src/unicode.cpp (unicode_regex_split) of the reference tree.
"""

from __future__ import annotations

import dataclasses
import heapq
import re
from collections.abc import Callable, Sequence

import numpy as np

from jaxquant.io import unicode_data as ud

# --- Pre-tokenizer regexes, spelled exactly as llama.cpp does (the custom splitters are keyed on them).
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_PUNCT_RUN = r"[\p{P}\$\+<=>\^~\|]+"


@dataclasses.dataclass(frozen=True)
class PreTokenizer:
    """What a ``tokenizer.ggml.pre`` name selects in llama.cpp's vocab loader."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a token is not merged
    clean_spaces: bool = True  # detokenize drops " ," " ." ... like llama.cpp
    add_bos: bool = False  # default before tokenizer.ggml.add_bos_token


def _table() -> dict[str, PreTokenizer]:
    default = PreTokenizer((_PUNCT_RUN, GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))
    llama3 = PreTokenizer((LLAMA3,), ignore_merges=True, add_bos=True)
    gpt2, gpt2_raw = PreTokenizer((GPT2,)), PreTokenizer((GPT2,), clean_spaces=False)
    qwen2, qwen2_clean = PreTokenizer((QWEN2,), clean_spaces=False), PreTokenizer((QWEN2,))
    starcoder, starcoder_raw = PreTokenizer((r"\p{N}", GPT2)), PreTokenizer((r"\p{N}", GPT2), clean_spaces=False)
    groups = {
        default: ["default"],
        llama3: ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                 "jina-v5-nano"],
        PreTokenizer((LLAMA3,)): ["dbrx", "smaug-bpe"],
        gpt2: ["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
               "modern-bert", "mpt", "olmo", "jais", "exaone4"],
        gpt2_raw: ["trillion", "granite-docling"],
        qwen2: ["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open", "grok-2"],
        qwen2_clean: ["stablelm2", "megrez"],
        PreTokenizer((QWEN35,), clean_spaces=False): ["qwen35"],
        starcoder: ["starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"],
        starcoder_raw: ["command-r", "smollm"],
        PreTokenizer((_PUNCT_RUN, GPT2, "[0-9][0-9][0-9]")): ["falcon"],
    }
    return {name: pre for pre, names in groups.items() for name in names}


PRE_TOKENIZERS: dict[str, PreTokenizer] = _table()

# --- llama.cpp's hand-written splitters. Each cuts one chunk of codepoints (lists ending in a sentinel:
# codepoint -1, flags 0, which is how unicode.cpp reads positions past the chunk) into word lengths.
_LETTER, _NUMBER, _MARK, _WS = ud.LETTER, ud.NUMBER, ud.MARK, ud.WHITESPACE
_CR, _LF, _SPACE, _QUOTE = 13, 10, 32, 39
Splitter = Callable[[list[int], list[int], Callable[[int], int]], list[int]]


def _same_case(c: int) -> int:
    return c


def _contraction(cpts: list[int], pos: int, lower: Callable[[int], int]) -> int:
    """Length of 's 't 'm 'd (2) or 're 've 'll (3) at pos, else 0; ``lower`` maps case as the regex does."""
    end = len(cpts) - 1
    if cpts[pos] != _QUOTE or pos + 1 >= end:
        return 0
    c1 = lower(cpts[pos + 1])
    if c1 in (115, 116, 109, 100):  # s t m d
        return 2
    if pos + 2 < end and (c1, lower(cpts[pos + 2])) in ((114, 101), (118, 101), (108, 108)):  # re ve ll
        return 3
    return 0


def _split_gpt2(cpts: list[int], flags: list[int], lower: Callable[[int], int]) -> list[int]:
    """'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S) (unicode_regex_split_custom_gpt2)."""
    out, pos, end = [], 0, len(cpts) - 1
    while pos < end:
        start, cpt = pos, cpts[pos]
        n = _contraction(cpts, pos, _same_case)
        f2 = flags[pos + 1] if cpt == _SPACE else flags[pos]
        if n:
            pos += n
        elif f2 & (_LETTER | _NUMBER):
            kind = f2 & (_LETTER | _NUMBER)
            pos += cpt == _SPACE
            while flags[pos] & kind:
                pos += 1
        elif not f2 & (_WS | _LETTER | _NUMBER) and f2:
            pos += cpt == _SPACE
            while not flags[pos] & (_WS | _LETTER | _NUMBER) and flags[pos]:
                pos += 1
        else:
            n = 0
            while flags[pos + n] & _WS:
                n += 1
            pos += n - 1 if n > 1 and pos + n < end else max(n, 1)  # \s+(?!\S), \s+, or no match
        out.append(pos - start)
    return out


def _split_llama3_like(word_mask: int, max_digits: int) -> Splitter:
    """The llama3 / qwen2 / qwen35 splitters, which differ in what a word is and how many digits group."""
    excluded = _WS | _NUMBER | word_mask

    def split(cpts: list[int], flags: list[int], lower: Callable[[int], int]) -> list[int]:
        out, pos, end = [], 0, len(cpts) - 1
        while pos < end:
            start, cpt, f = pos, cpts[pos], flags[pos]
            n = _contraction(cpts, pos, lower)
            if n:
                pos += n
            elif cpt not in (_CR, _LF) and not f & _NUMBER and (f & word_mask or flags[pos + 1] & word_mask):
                pos += 1  # [^\r\n\p{L}\p{N}]?\p{L}+
                while flags[pos] & word_mask:
                    pos += 1
            elif f & _NUMBER:  # \p{N}{1,max_digits}
                while flags[pos] & _NUMBER and pos - start < max_digits:
                    pos += 1
            elif not (flags[pos + 1] if cpt == _SPACE else f) & excluded:  # ' ?[^\s\p{L}\p{N}]+[\r\n]*'
                pos += cpt == _SPACE
                while flags[pos] and not flags[pos] & excluded:
                    pos += 1
                while cpts[pos] in (_CR, _LF):
                    pos += 1
            else:
                n, last_rn = 0, 0
                while flags[pos + n] & _WS:
                    if cpts[pos + n] in (_CR, _LF):
                        last_rn = pos + n + 1
                    n += 1
                if last_rn:  # \s*[\r\n]+
                    pos = last_rn
                else:  # \s+(?!\S), \s+, or no match
                    pos += n - 1 if n > 1 and pos + n < end else max(n, 1)
            out.append(pos - start)
        return out

    return split


_CUSTOM = {
    GPT2: _split_gpt2,
    LLAMA3: _split_llama3_like(_LETTER, 3),
    QWEN2: _split_llama3_like(_LETTER, 1),
    QWEN35: _split_llama3_like(_LETTER | _MARK, 1),
}

# --- llama.cpp's std::regex fallback: \p{X} classes become single stand-in characters (0xD1..0xD5) in both
# the regex and a "collapsed" copy of the text, where other non-ASCII codepoints become 0xD0 or, if
# whitespace, 0x0B. Python's re with re.ASCII then behaves as ECMAScript std::regex on these patterns.
_UCAT = {r"\p{N}": ud.NUMBER, r"\p{L}": ud.LETTER, r"\p{P}": ud.PUNCTUATION, r"\p{M}": ud.MARK,
         r"\p{S}": ud.SYMBOL, r"\p{Lu}": ud.LETTER, r"\p{Ll}": ud.LETTER, r"\p{Lt}": ud.LETTER,
         r"\p{Lm}": ud.LETTER, r"\p{Lo}": ud.LETTER}
_UCAT_CHAR = {ud.NUMBER: "\xd1", ud.LETTER: "\xd2", ud.PUNCTUATION: "\xd3", ud.MARK: "\xd4", ud.SYMBOL: "\xd5"}
_UCAT_ASCII = {ud.NUMBER: "0-9", ud.LETTER: "A-Za-z", ud.PUNCTUATION: r"!-#%-*,-/:-;?-@\[-\]_\{\}",
               ud.MARK: "", ud.SYMBOL: r"\$\+<->^`\|\~"}


def _collapse_regex(regex: str) -> str:
    """The regex with each \\p{X} replaced by [stand-in + its ASCII members] (brackets added outside [])."""
    out, inside, i = [], False, 0
    while i < len(regex):
        ch = regex[i]
        if ch == "[" and (i == 0 or regex[i - 1] != "\\"):
            inside = True
        elif inside and ch == "]" and regex[i - 1] != "\\":
            inside = False
        elif regex.startswith(r"\p{", i) and (close := regex.find("}", i + 3)) != -1 and regex[i:close + 1] in _UCAT:
            cat = _UCAT[regex[i:close + 1]]
            body = _UCAT_CHAR[cat] + _UCAT_ASCII[cat]
            out.append(body if inside else f"[{body}]")
            i = close + 1
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _collapse_text(cpts: np.ndarray, flags: np.ndarray, categories: bool) -> str:
    """The text as llama.cpp feeds std::regex: ASCII kept, other codepoints replaced as described above."""
    if categories:
        table = np.full(256, 0xD0, dtype=np.uint32)
        for cat, ch in _UCAT_CHAR.items():
            table[cat] = ord(ch)
        repl = table[flags & ud.CATEGORIES]
    else:  # std::wregex path: only non-ASCII whitespace is replaced
        repl = cpts
    out = np.where(cpts < 128, cpts, np.where(flags & ud.WHITESPACE, 0x0B, repl)).astype(np.uint32)
    return out.tobytes().decode("utf-32-le")


def _split_regex(text: str, regex: str, offsets: list[int]) -> list[int]:
    """unicode_regex_split_stl: matches and the gaps between them become words, chunk by chunk."""
    pattern = re.compile(regex, re.ASCII)
    out, start = [], 0
    for length in offsets:
        end, last = start + length, start
        for m in pattern.finditer(text, start, end):
            if m.start() > last:
                out.append(m.start() - last)
            out.append(m.end() - m.start())
            last = m.end()
        if last < end:
            out.append(end - last)
        start = end
    return out


def pre_split(text: str, regexes: Sequence[str]) -> list[str]:
    """Cut text into words as llama.cpp's unicode_regex_split does (before byte encoding)."""
    if not text:
        return []
    all_flags, lower_map = ud.tables()

    def lower(c: int) -> int:
        return lower_map.get(c, c)

    cpts_np = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    flags_np = all_flags[cpts_np]
    cpts, flags = cpts_np.tolist(), flags_np.tolist()
    offsets = [len(cpts)]
    for regex in regexes:
        if regex in _CUSTOM:
            out, start = [], 0
            for length in offsets:
                end = start + length
                out += _CUSTOM[regex](cpts[start:end] + [-1], flags[start:end] + [0], lower)
                start = end
            offsets = out
        else:
            categories = any(cat in regex for cat in _UCAT)
            subject = _collapse_text(cpts_np, flags_np, categories)
            offsets = _split_regex(subject, _collapse_regex(regex) if categories else regex, offsets)
    words, start = [], 0
    for length in offsets:
        words.append(text[start:start + length])
        start += length
    return words


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (unicode_byte_to_utf8_map)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {ch: b for b, ch in enumerate(BYTE_TO_UNICODE)}


def byte_encode(word: str) -> str:
    """A word's UTF-8 bytes spelled with GPT-2's byte characters."""
    return "".join(BYTE_TO_UNICODE[b] for b in word.encode("utf-8"))


def merge(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The symbols of a byte-encoded word after merging adjacent pairs, lowest rank (then leftmost) first."""
    n = len(word)
    length, prev, nxt = [1] * n, list(range(-1, n - 1)), [*range(1, n), -1]

    def sym(i: int) -> str:  # symbol i always starts at character i
        return word[i:i + length[i]]

    heap: list[tuple[int, int, int, str]] = []

    def add(left: int, right: int) -> None:
        if left != -1 and right != -1 and (rank := ranks.get((sym(left), sym(right)))) is not None:
            heapq.heappush(heap, (rank, left, right, sym(left) + sym(right)))

    for i in range(1, n):
        add(i - 1, i)
    while heap:
        _, left, right, text = heapq.heappop(heap)
        if not length[left] or not length[right] or sym(left) + sym(right) != text:
            continue  # outdated pair
        length[left] += length[right]
        length[right] = 0
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        add(prev[left], left)
        add(left, nxt[left])
    return [sym(i) for i in range(n) if length[i]]
