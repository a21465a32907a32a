"""Tokenizing by lines with a cache: the engine keyer's tokens for a prompt whose lines were seen before.

Design
------
Tokenizing is most of what engine-exact keys cost (about 1 µs per token with the `tokenizers`
library; BENCHMARKS.md, "Exact cache state"). Yet a prefix-cache router sees the same text again
and again: a chat request repeats the system prompt and every earlier turn, an agent loop its
whole history. So the text is cut into chunks of whole lines and each chunk is tokenized once:

  cut       after a "\\n" with a non-whitespace character on each side (`(?<=\\S\\n)(?=\\S)`), at
            the first such place at least CHUNK_CHARS (256) characters into the chunk, left to
            right: two texts that share a prefix are cut the same way up to the chunk in which they
            part (one regex scan, `chunk_pattern`; a cut at every line would cost a dictionary lookup per
            line, more than the tokenizing it saves on short lines).
  encode    each distinct chunk alone (`encode_batch_fast`, no special tokens), from a cache of
            chunks already seen (LRU, bounded in tokens); the prompt's ids are the chunks' ids in
            order, plus the post-processor's special tokens when they are asked for.

This is exact only where the tokenizer never lets a token cross such a cut. `tokenizers` splits
a text on its added tokens first, then normalizes, pre-tokenizes and runs the model on each piece;
BPE and WordPiece never merge across pre-tokens. The GPT-2 regex of the ByteLevel pre-tokenizer
(GPT-2, the tiny Llama here) and the regexes of Llama 3 and Qwen 2 end a pre-token at such a
newline: no alternative matches a newline together with a later non-whitespace character, a
match of the character before it stops at the newline (Llama 3's symbols take the newline
along), and a lone newline between two non-whitespace characters is the same piece whether text
follows it or the line ends there. (Whitespace before the newline would not be: GPT-2's
`\\s+(?!\\S)` splits " \\n" before "b" into " " and "\\n", but takes " \\n" whole at the end of a
text; so a newline after whitespace is never a cut.) What breaks it, and so turns the cache off
(`reason` says why, and the prompt is then tokenized whole, as before):
  - a pre-tokenizer that does not split at that newline: Metaspace (SentencePiece-style Llama 2,
    Mistral: "\\n" stays inside the word) or none at all (the model sees the whole piece);
  - ByteLevel with add_prefix_space (each piece would gain a space that a mid-text line does not);
  - a normalizer other than NFC, NFD and lowercasing (Strip, Prepend, Replace act at a
    piece's edges or across characters);
  - an added token containing a newline or stripping whitespace on its left (it would swallow the
    previous line's "\\n");
  - BPE dropout (random), and truncation or padding set in tokenizer.json.
Beyond these structural checks every tokenizer is verified at start-up: a sample text with
newlines before letters, digits, symbols, spaces, tabs, added tokens and non-ASCII text is
tokenized whole and cut at every line, and any difference turns the cache off. The tests compare the two
ways on random texts (tests/test_line_tokens.py).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

CHUNK_CHARS = 256
"""A chunk's least length in characters (the last chunk of a text may be shorter)."""


def chunk_pattern(least_chars: int) -> re.Pattern[str]:
    """The regex whose `findall` gives a text's chunks: each ends after a newline with a
    non-whitespace character on each side, at the first such place `least_chars` characters in,
    or at the end of the text (1: at every such newline)."""
    return re.compile(r".{%d,}?(?<=\S\n)(?=\S)|.+" % max(1, least_chars), re.DOTALL)

SAFE_NORMALIZERS = frozenset({"NFC", "NFD", "Lowercase"})
SAFE_PRE_TOKENIZERS = frozenset({"ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit"})
SPLITTING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Split", "Whitespace", "WhitespaceSplit"})
"""Of those, the ones that split at whitespace (ByteLevel only with use_regex; Split's pattern is
left to the self-check)."""
SAFE_MODELS = frozenset({"BPE", "WordPiece", "WordLevel"})

SELF_CHECK_TEXT = (
    "System: you are a helpful assistant.\nRules:\n- be brief\n- cite sources\n\n"
    "User: what's 12345 + 678?\n  indented line\n\tTabbed line\n\n\nThree newlines before this.\n"
    "1. first\n2. second\n(parenthesis) and [brackets]\n\"quoted\"\n'single'\n's contraction\n"
    "Ünïcödé ligne\n日本語の行\n🙂 emoji line\n \n trailing space line \nend</s>\n<s>next\r\nCRLF line\n"
    "def f(x):\n    return x  # comment\n}\n{\n:colon\n.\n,comma\n"
)
"""Start-up self-check text (added tokens of the tokenizer are appended to it)."""


class LineTokenizer:
    """A `tokenizers.Tokenizer` whose results are built line by line from a cache (module comment).

    Args:
        tokenizer: the loaded `tokenizers.Tokenizer`.
        cache_tokens: the cache's bound, in tokens held (0: no cache; every text is encoded whole).
        chunk_chars: a chunk's least length in characters (1: a chunk per line; tests use it).

    Attributes:
        reason: None when the cache is on, else why it is off (the tokenizer could let a token
            cross a line cut, or the start-up self-check found a difference).
        chunks_seen, chunks_encoded: chunks looked up, and of those the ones that had to be encoded.
    """

    def __init__(self, tokenizer: Any, cache_tokens: int = 4_000_000, chunk_chars: int = CHUNK_CHARS) -> None:
        self.tokenizer = tokenizer
        self.cache_tokens = int(cache_tokens)
        self._chunks = chunk_pattern(chunk_chars)
        # encode_batch_fast (tokenizers >= 0.21) skips the offsets; older versions have encode_batch
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self.chunks_seen = 0
        self.chunks_encoded = 0
        self.reason = "cache_tokens is 0" if self.cache_tokens <= 0 else structural_reason(json.loads(tokenizer.to_str()))
        self._prefix, self._suffix = self._special_wrap()
        if self.reason is None and self._prefix is None:
            self.reason = "the post-processor does not only add tokens before and after the text"
        if self.reason is None:
            self.reason = self._self_check()
            self.clear()

    # ---- public ----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool) -> np.ndarray:
        """The token ids `tokenizer.encode(text, add_special_tokens=...)` gives, as uint32."""
        if self.reason is not None:
            return np.asarray(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, dtype=np.uint32)
        return self._from_chunks(self._chunks.findall(text), add_special_tokens)

    def clear(self) -> None:
        """Forget every cached chunk."""
        with self._lock:
            self._cache.clear()
            self._held = 0

    @property
    def held_tokens(self) -> int:
        """Tokens held in the cache now."""
        return self._held

    # ---- internals -------------------------------------------------------------------------------

    def _from_chunks(self, chunks: list[str], add_special_tokens: bool) -> np.ndarray:
        """The ids of a text cut into `chunks`: each chunk from the cache or tokenized (and cached)."""
        parts: list[np.ndarray | None] = []
        missing: dict[str, list[int]] = {}
        with self._lock:
            for k, chunk in enumerate(chunks):
                ids = self._cache.get(chunk)
                if ids is None:
                    missing.setdefault(chunk, []).append(k)
                else:
                    self._cache.move_to_end(chunk)
                parts.append(ids)
            self.chunks_seen += len(chunks)
            self.chunks_encoded += len(missing)
        if missing:
            todo = list(missing)
            encoded = self._encode_batch(todo, add_special_tokens=False)  # releases the GIL
            with self._lock:
                for chunk, enc in zip(todo, encoded):
                    ids = np.asarray(enc.ids, dtype=np.uint32)
                    for k in missing[chunk]:
                        parts[k] = ids
                    self._remember(chunk, ids)
        body = [p for p in parts if p is not None and len(p)]
        if add_special_tokens:
            assert self._prefix is not None and self._suffix is not None
            body = [self._prefix, *body, self._suffix]
        return np.concatenate(body) if body else np.zeros(0, dtype=np.uint32)

    def _remember(self, chunk: str, ids: np.ndarray) -> None:
        """Cache a chunk's ids (lock held), evicting the least recently used past the bound."""
        if chunk in self._cache or len(ids) > self.cache_tokens:
            return
        self._cache[chunk] = ids
        self._held += len(ids)
        while self._held > self.cache_tokens:
            _, old = self._cache.popitem(last=False)
            self._held -= len(old)

    def _special_wrap(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The post-processor's special tokens before and after a text, found by encoding probes
        with and without them; (None, None) when it does anything else."""
        found = None
        for probe in ("probe text", "another\nprobe 123"):
            plain = self.tokenizer.encode(probe, add_special_tokens=False).ids
            full = self.tokenizer.encode(probe, add_special_tokens=True).ids
            starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
            if not plain or not starts:
                return None, None
            i = starts[0]
            wrap = (tuple(full[:i]), tuple(full[i + len(plain) :]))
            if found is not None and wrap != found:
                return None, None
            found = wrap
        assert found is not None
        return np.asarray(found[0], dtype=np.uint32), np.asarray(found[1], dtype=np.uint32)

    def _self_check(self) -> str | None:
        """None when the sample text tokenizes the same whole and by lines (both with and without
        special tokens), else the first difference."""
        added = [t.content for t in self.tokenizer.get_added_tokens_decoder().values()]
        sample = SELF_CHECK_TEXT + "".join(f"{t}\nline after {t}\n{t}" for t in added[:64]) + "\nlast"
        every_line = chunk_pattern(1).findall(sample)  # a chunk per line: every cut is checked
        for special in (False, True):
            whole = self.tokenizer.encode(sample, add_special_tokens=special).ids
            lined = self._from_chunks(every_line, special).tolist()
            if whole != lined:
                at = next((i for i, (a, b) in enumerate(zip(whole, lined)) if a != b), min(len(whole), len(lined)))
                return f"self-check: tokenizing by lines differs from the whole text at token {at}"
        return None


def structural_reason(spec: dict[str, Any]) -> str | None:
    """Why this tokenizer (tokenizer.json as a dict) could let a token cross a line cut, or None."""
    if spec.get("truncation") is not None or spec.get("padding") is not None:
        return "tokenizer.json sets truncation or padding"
    for tok in spec.get("added_tokens") or []:
        if "\n" in tok.get("content", "") or tok.get("lstrip"):
            return f"added token {tok.get('content')!r} contains a newline or strips whitespace on its left"
    normalizers = _flatten(spec.get("normalizer"), "normalizers")
    bad = [n.get("type") for n in normalizers if n.get("type") not in SAFE_NORMALIZERS]
    if bad:
        return f"normalizer {bad[0]} may act across a line cut"
    pre = _flatten(spec.get("pre_tokenizer"), "pretokenizers")
    if not pre:
        return "no pre-tokenizer: the model sees whole pieces of text"
    for p in pre:
        kind = p.get("type")
        if kind not in SAFE_PRE_TOKENIZERS:
            return f"pre-tokenizer {kind} does not split at newlines"
        if kind == "ByteLevel" and p.get("add_prefix_space"):
            return "ByteLevel add_prefix_space prepends a space to every piece"
        if kind == "Split" and p.get("behavior") not in ("Isolated", "Removed"):
            return f"Split behavior {p.get('behavior')} joins a match to its neighbour"
    if not any(p.get("type") in SPLITTING_PRE_TOKENIZERS and p.get("use_regex", True) for p in pre):
        return "no member of the pre-tokenizer splits at newlines"
    model = spec.get("model") or {}
    if model.get("type") not in SAFE_MODELS:
        return f"model {model.get('type')} is not handled"
    if model.get("dropout"):
        return "BPE dropout is random"
    return None


def _flatten(node: Any, key: str) -> list[dict[str, Any]]:
    """A tokenizer.json component as a flat list (a Sequence's members, recursively)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [leaf for member in node.get(key) or [] for leaf in _flatten(member, key)]
    return [node]
