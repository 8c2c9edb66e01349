"""A deterministic, varied English-like text for perplexity tests, sweeps and notebooks (no download)."""

from __future__ import annotations

import random

_SUBJECTS = ["the old farmer", "a young engineer", "the committee", "my neighbour", "the river", "our teacher",
             "the ship's captain", "a small child", "the city council", "the tired doctor", "every student",
             "the north wind", "a quiet librarian", "the baker's daughter", "the village", "an honest merchant"]
_VERBS = ["watched", "repaired", "described", "forgot", "carried", "followed", "painted", "questioned", "built",
          "discovered", "remembered", "counted", "ignored", "welcomed", "measured", "explained"]
_OBJECTS = ["the broken bridge", "a letter from home", "the long winter", "three grey horses", "the evening news",
            "a map of the coast", "the price of bread", "an empty house", "the first snow", "a box of old tools",
            "the harvest", "the new railway", "a song about the sea", "the census records", "the garden wall"]
_PLACES = ["near the harbour", "before dawn", "in the market square", "after the storm", "behind the church",
           "during the festival", "on the hill road", "at the edge of the forest", "in a crowded train",
           "by the fire", "under the stone arch", "along the canal"]
_LINKS = ["because", "although", "while", "so that", "until", "and then", "but", "since"]
_OPENERS = ["In those years,", "Later that week,", "Nobody knows why,", "As the story goes,", "For a while,",
            "Without a word,", "By the end of the month,", "Some say that"]


def _clause(r: random.Random) -> str:
    return f"{r.choice(_SUBJECTS)} {r.choice(_VERBS)} {r.choice(_OBJECTS)} {r.choice(_PLACES)}"


def english_text(n_words: int, seed: int = 0) -> str:
    """About ``n_words`` words (about 1.3 Gemma tokens each) in paragraphs of sentences."""
    r = random.Random(seed)
    paragraphs, words = [], 0
    while words < n_words:
        sentences = []
        for _ in range(r.randint(3, 7)):
            s = _clause(r)
            if r.random() < 0.5:
                s = f"{s} {r.choice(_LINKS)} {_clause(r)}"
            if r.random() < 0.3:
                s = f"{r.choice(_OPENERS)} {s}"
            if r.random() < 0.15:
                s = f"{s}, in {r.randint(1700, 1999)}"
            s = s[0].upper() + s[1:] + r.choice([".", ".", ".", "!", "?"])
            sentences.append(s)
            words += len(s.split())
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"
