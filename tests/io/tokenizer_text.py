"""A varied test text for tokenizers, built from a fixed seed (prose, code, digits, unicode, whitespace)."""

from __future__ import annotations

import random

_WORDS = ("the quick brown fox jumps over lazy dog while tokenizers split words into pieces and merge "
          "frequent pairs model quantization llama gemma weights bytes block scale exact kernel memory "
          "I'm you're they've we'll she'd it's DON'T Can't O'Neil rock'n'roll naïve café résumé façade").split()
_UNICODE = ["日本語のテキスト", "中文分词测试", "한국어 문장입니다", "Ελληνικά γράμματα", "Русский текст",
            "العربية نص", "हिन्दी पाठ", "ภาษาไทย", "e\u0301\u0302 a\u0308 n\u0303", "Z\u0351\u0352a\u0353l\u0354g\u0355o",
            "😀🎉👍🏽👨‍👩‍👧‍👦🇯🇵", "∑∫√∞≠≈ ½ ¾ ① ② ⅷ", "ｆｕｌｌｗｉｄｔｈ　ｓｐａｃｅ", "\u00a0nbsp\u2009thin\u3000ideo",
            "ﬁ ﬂ Å ẞ ǅ", "🧑🏿‍🚀 ❤️ ✈︎", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚", "\u200bzero\u200dwidth\ufeff"]
_CODE = ["def f(x: int) -> int:\n    return x ** 2  # square\n",
         "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
         "if __name__ == '__main__':\n    main()\n", "SELECT id, name FROM users WHERE age >= 21;\n",
         "<div class=\"x\"><b>bold</b> <i>it</i></div>\n", "x = {'a': [1, 2, 3], \"b\": (4.5e-3, -6)}\n",
         "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); }\n", "$ ls -la | grep '^d' && echo ok\n",
         "<start_of_turn>user\nhi<end_of_turn>\n<bos></s><unk>\n", "<|endoftext|><|im_start|>[INST]\n"]
_SPACES = [" ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n ", "\u2028", "        "]


def varied_text(seed: int = 0, min_bytes: int = 20_000) -> str:
    """Random mix of prose, code, numbers, unicode and whitespace runs of at least ``min_bytes`` UTF-8 bytes."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < min_bytes:
        kind = rng.random()
        if kind < 0.45:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 15))]
            piece = " ".join(w.capitalize() if rng.random() < 0.1 else w for w in words) + rng.choice(".,;:!? ")
        elif kind < 0.6:
            piece = rng.choice(_CODE)
        elif kind < 0.7:
            piece = rng.choice([str(rng.randint(0, 10 ** rng.randint(1, 12))), f"{rng.uniform(-1e4, 1e4):.{rng.randint(0, 6)}f}",
                                "1,234,567.89", "2024-05-09T07:35:25Z", "0x1F600", "3.14159e+10", "١٢٣ ४५६"])
        elif kind < 0.85:
            piece = rng.choice(_UNICODE)
        else:
            piece = rng.choice(_SPACES) * rng.randint(1, 3)
        parts.append(piece + (rng.choice(_SPACES) if rng.random() < 0.3 else " "))
        size += len(parts[-1].encode("utf-8"))
    return "".join(parts)
