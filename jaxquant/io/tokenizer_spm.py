"""llama.cpp's SentencePiece-style tokenizer (GGUF ``tokenizer.ggml.model = llama``), ported step for step.

Source: llm_tokenizer_spm_session in src/llama-vocab.cpp of the reference tree. The fragment
(spaces already escaped to U+2581) starts as one symbol per character; the adjacent pair whose
concatenation is the vocab token of highest score (then leftmost) is merged until none is left,
and characters that never became tokens fall back to their <0xXX> byte tokens.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence


def tokenize(text: str, token_to_id: dict[str, int], scores: Sequence[float],
             byte_to_token: Callable[[int], int]) -> list[int]:
    """Token ids of one escaped text fragment."""
    n = len(text)
    length, prev, nxt = [1] * n, list(range(-1, n - 1)), [*range(1, n), -1]
    heap: list[tuple[float, int, int, int]] = []

    def add(left: int, right: int) -> None:
        if left == -1 or right == -1:
            return
        size = length[left] + length[right]
        token = token_to_id.get(text[left:left + size])  # symbol i always starts at character i
        if token is not None:
            heapq.heappush(heap, (-scores[token], left, right, size))

    for i in range(1, n):
        add(i - 1, i)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        if not length[left] or not length[right] or length[left] + length[right] != size:
            continue  # one side was merged since
        length[left] = size
        length[right] = 0
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        add(prev[left], left)
        add(left, nxt[left])

    out: list[int] = []
    for i in range(n):
        if length[i]:
            # Merged symbols are tokens by construction; llama.cpp's rev_merge fallback only ever
            # sees single characters here, for which it emits the bytes.
            token = token_to_id.get(text[i:i + length[i]])
            out.extend([token] if token is not None else map(byte_to_token, text[i].encode("utf-8")))
    return out
