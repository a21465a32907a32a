"""Tokenizing by lines with a cache (pylb.router.line_tokens) gives exactly the ids of tokenizing
the whole text, on random texts, for the tiny Llama's GPT-2-style tokenizer and GPT-2-style and
Llama-3-style ones trained here; tokenizers that could let a token cross a line are refused (and
then tokenized whole, still exactly)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

tokenizers = pytest.importorskip("tokenizers")

from pylb.router.line_tokens import LineTokenizer, structural_reason  # noqa: E402

TINY_LLAMA = Path(__file__).parent / "data" / "kv_events" / "tiny-llama" / "tokenizer.json"
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PIECES = ["a", "b", "Hello", " world", "12", "345", ".", ",", "!?", "'s", "'ll", '"', "(", ")", "{", "}", ":", "-", "#",
          " ", "  ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", "é", "日本", "🙂", "<s>", "</s>", "<|im_start|>"]  # fmt: skip
texts = st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=40).map("".join)


def _corpus() -> list[str]:
    return [
        "System: you are a helpful assistant.\nUser: what's 12345 + 678?\n  indented\n\ttab\n",
        "def f(x):\n    return x  # comment\n}\n{\nHello world! It's 2026.\n\n\nThree lines.\r\nCRLF\n",
        "日本語の行\n🙂 emoji\nÜnïcödé\n'll 've 're\n",
    ] * 20


@pytest.fixture(scope="module")
def tiny_llama() -> LineTokenizer:
    return LineTokenizer(tokenizers.Tokenizer.from_file(str(TINY_LLAMA)), chunk_chars=1)  # a chunk per line: every cut is tested


@pytest.fixture(scope="module")
def llama3_style() -> LineTokenizer:
    """A byte-level BPE with Llama 3's pre-tokenizer (Split on its regex, then ByteLevel without
    regex) and added tokens, trained on a small corpus: Llama 3's pipeline, a small vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<|im_start|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return LineTokenizer(tok, chunk_chars=1)


@pytest.fixture(scope="module")
def gpt2_style() -> LineTokenizer:
    """A byte-level BPE with GPT-2's regex (ByteLevel with use_regex), trained where " \\n" is
    common, so that it has a token for it (the tiny Llama's small vocabulary has none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    corpus = [t.replace("\n", " \n") for t in _corpus()] + _corpus()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return LineTokenizer(tok, chunk_chars=1)


def _same(lines: LineTokenizer, text: str) -> None:
    for special in (False, True):
        whole = lines.tokenizer.encode(text, add_special_tokens=special).ids
        assert lines.encode(text, special).tolist() == whole, (text, special)


def test_these_tokenizers_cache_lines(tiny_llama: LineTokenizer, llama3_style: LineTokenizer, gpt2_style: LineTokenizer) -> None:
    assert tiny_llama.reason is None
    assert llama3_style.reason is None
    assert gpt2_style.reason is None


@SETTINGS
@given(texts)
def test_tiny_llama_by_lines_equals_whole(tiny_llama: LineTokenizer, text: str) -> None:
    _same(tiny_llama, text)


@SETTINGS
@given(texts)
def test_llama3_style_by_lines_equals_whole(llama3_style: LineTokenizer, text: str) -> None:
    _same(llama3_style, text)


def test_default_chunks_of_long_texts_equal_whole() -> None:
    lines = LineTokenizer(tokenizers.Tokenizer.from_file(str(TINY_LLAMA)))
    for text in ("".join(_corpus()), "x" * 1000 + "\n" + "y" * 10, "".join(f"line {i}\n" for i in range(300))):
        _same(lines, text)
        _same(lines, text + " and more")
    assert lines.chunks_seen > lines.chunks_encoded > 0


@SETTINGS
@given(texts)
def test_gpt2_style_by_lines_equals_whole(gpt2_style: LineTokenizer, text: str) -> None:
    _same(gpt2_style, text)


def test_a_newline_after_whitespace_is_not_a_cut(gpt2_style: LineTokenizer) -> None:
    """GPT-2's regex keeps " \\n" whole at the end of a text but splits it before a letter: a cut
    there would change the tokens, which is why only a newline between two non-whitespace
    characters is a cut."""
    tok = gpt2_style.tokenizer
    assert tok.encode(" \n", add_special_tokens=False).ids != tok.encode(" ", add_special_tokens=False).ids + tok.encode("\n", add_special_tokens=False).ids
    assert tok.encode(" \nb", add_special_tokens=False).ids != tok.encode(" \n", add_special_tokens=False).ids + tok.encode("b", add_special_tokens=False).ids
    _same(gpt2_style, "a \nb \nc\nd")


def test_repeated_lines_come_from_the_cache(tiny_llama: LineTokenizer) -> None:
    tiny_llama.clear()
    head = "".join(f"system rule {i}: be brief.\n" for i in range(50))
    _same(tiny_llama, head + "question one?")
    encoded = tiny_llama.chunks_encoded
    _same(tiny_llama, head + "question two?")
    _same(tiny_llama, head + "question two?")  # twice: once without special tokens, once with
    assert tiny_llama.chunks_encoded - encoded == 1  # only the new last line was tokenized


def test_the_cache_stays_within_its_bound() -> None:
    lines = LineTokenizer(tokenizers.Tokenizer.from_file(str(TINY_LLAMA)), cache_tokens=200, chunk_chars=1)
    for i in range(100):
        _same(lines, "".join(f"line {i} {j} with a few words\n" for j in range(10)) + "end")
        assert lines.held_tokens <= 200


def test_metaspace_tokenizers_are_tokenized_whole() -> None:
    """SentencePiece-style (Metaspace): "\\n" stays inside a word, so lines are not cut; the
    results are still the whole text's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=300))
    lines = LineTokenizer(tok)
    assert lines.reason is not None and "Metaspace" in lines.reason
    for text in _corpus()[:3]:
        _same(lines, text)


@pytest.mark.parametrize(
    "change, why",
    [
        ({"pre_tokenizer": None}, "no pre-tokenizer"),
        ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}}, "add_prefix_space"),
        ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}}, "splits at newlines"),
        ({"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Strip"}]}}, "Strip"),
        ({"added_tokens": [{"content": "<x>", "lstrip": True}]}, "<x>"),
        ({"added_tokens": [{"content": "a\nb"}]}, "newline"),
        ({"truncation": {"max_length": 8}}, "truncation"),
    ],
)
def test_structural_refusals(change: dict, why: str) -> None:
    spec = json.loads(TINY_LLAMA.read_text())
    assert structural_reason(spec) is None
    spec.update(change)
    reason = structural_reason(spec)
    assert reason is not None and why in reason


def test_engine_keyer_uses_the_line_cache() -> None:
    from pylb.router.engine_keys import EngineKeyer

    keyer = EngineKeyer(TINY_LLAMA.parent, block_size=16)
    system = "".join(f"Rule {i}: answer in one line.\n" for i in range(40))
    history = [{"role": "system", "content": system}, {"role": "user", "content": "first question"}]
    first = keyer.keys_for("chat", {"messages": history})
    before = keyer.lines.chunks_encoded
    history += [{"role": "assistant", "content": "an answer"}, {"role": "user", "content": "second question"}]
    ids = keyer.token_ids("chat", {"messages": history})
    text = keyer.render_chat(history)
    assert text is not None and ids == keyer.tokenizer.encode(text, add_special_tokens=False).ids
    assert keyer.lines.chunks_encoded - before <= 4  # the new turns' lines, not the system prompt again
    second = keyer.keys_for("chat", {"messages": history})
    assert first is not None and second is not None
    assert second.keys[: len(first.keys) - 1].tolist() == first.keys[: len(first.keys) - 1].tolist()
    off = EngineKeyer(TINY_LLAMA.parent, block_size=16, line_cache_tokens=0)
    assert off.lines.reason is not None and off.token_ids("chat", {"messages": history}) == ids
