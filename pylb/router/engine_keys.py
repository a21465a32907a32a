"""Engine-exact block keys: a request's prompt as the vLLM engine will hash it (issue 12 §2).

Design
------
vLLM's KV events name blocks by its own prefix-caching hashes over *token ids*, so to look a new
prompt up in the events mirror pylb must tokenize it exactly as the replica will and hash its
full blocks exactly as vLLM does:

  tokenize   `tokenizers.Tokenizer.from_file(tokenizer.json)` (the served model's file).
             /v1/completions text: `encode(prompt, add_special_tokens=True)` (vLLM's default for
             completions: the tokenizer's post-processor adds e.g. BOS). Token-id prompts are
             taken as they are.
             /v1/chat/completions: the messages rendered with the model's chat template (Jinja,
             rendered as transformers' `apply_chat_template` does and vLLM calls it: a sandboxed
             environment with trim_blocks and lstrip_blocks, the loopcontrols extension,
             `raise_exception`, `strftime_now` and a `tojson` filter that does not escape HTML;
             variables `messages`, `tools`, `add_generation_prompt=True` and the special tokens
             `bos_token`, `eos_token`, `unk_token`, `pad_token` from tokenizer_config.json),
             then `encode(text, add_special_tokens=False)` (vLLM's chat default: the template
             adds what it needs). Message content given as a list of text parts is joined with
             "\\n" (vLLM's "string" content format); any other part (an image, audio) makes the
             request not keyable (vLLM adds multi-modal extra keys pylb cannot reproduce).
  hash       `pylb.native.engine_block_hashes(ids, block_size)`: SHA-256 over canonical CBOR of
             (parent hash, block token ids, None), chained from NONE_HASH of the seed string
             "vllm-none-hash" (see csrc/include/pylb/engine_hash.hpp). This is vLLM's
             `--prefix-caching-hash-algo sha256_cbor` of vLLM 0.1x-0.32 (v1 engine), verified
             against the hashes a vLLM 0.32.0 replica published (tests/data/kv_events/). It does
             not match `sha256` (pickle) or the xxhash algorithms, requests with `cache_salt`,
             LoRA adapters, multi-modal inputs or prompt embeddings (their blocks carry extra
             keys), nor a vLLM run with PYTHONHASHSEED set (its seed replaces the default; set
             `hash_seed` to the same value).

A keyer that cannot key a request (unsupported content, a template error) returns None: the
request is routed on the predicted mirror alone, never refused for that.

Cost (bench/bench_kv_events.py measures it): tokenizing is the main cost, O(prompt length),
run by the proxy in a thread pool off the event loop (the `tokenizers` library releases the
GIL while it encodes); lines already seen are not tokenized again (`pylb.router.line_tokens`:
exact, checked per tokenizer at start-up, off where a token could cross a line); hashing is one
SHA-256 per block in the native core.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from pylb import native
from pylb.router.line_tokens import LineTokenizer

DEFAULT_HASH_SEED = "vllm-none-hash"
"""vLLM's NONE_HASH seed for sha256_cbor when PYTHONHASHSEED is not set (DEFAULT_NONE_HASH_SEED)."""


class EngineKeyerError(ValueError):
    """The tokenizer or the chat template could not be loaded (raised at start-up)."""


@dataclass(frozen=True, slots=True)
class EngineKeys:
    """A prompt as the engine sees it: its token count and one key per full engine block."""

    prompt_tokens: int
    keys: np.ndarray  # uint64, one per full block of block_size tokens
    block_size: int


class EngineKeyer:
    """Tokenizes and hashes requests as a vLLM replica of the same model does (see module comment).

    Args:
        tokenizer_path: the model's tokenizer.json, or its folder.
        block_size: the engine's KV block size in tokens (vLLM `--block-size`).
        chat_template: a Jinja chat template file; None: the folder's chat_template.jinja, else
            tokenizer_config.json's "chat_template".
        hash_seed: the NONE_HASH seed (vLLM's PYTHONHASHSEED when set there).
        line_cache_tokens: bound of the line cache (`pylb.router.line_tokens`) in tokens; 0 turns
            it off (every prompt is tokenized whole).
    """

    def __init__(
        self, tokenizer_path: str | Path, block_size: int, chat_template: str | Path | None = None, hash_seed: str = DEFAULT_HASH_SEED, line_cache_tokens: int = 4_000_000
    ) -> None:
        if block_size <= 0:
            raise EngineKeyerError(f"block_size must be a positive number of tokens, got {block_size}")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise EngineKeyerError("engine-exact keys need the `tokenizers` library: pip install 'pylb[tokenizer]'") from None
        path = Path(tokenizer_path)
        folder = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises its own Exception type for a bad file
            raise EngineKeyerError(f"cannot load the tokenizer {str(file)!r}: {exc}") from None
        config: dict[str, Any] = {}
        cfg_file = folder / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise EngineKeyerError(f"cannot read {str(cfg_file)!r}: {exc}") from None
        self.special_tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.block_size = int(block_size)
        self.parent = native.engine_none_hash(hash_seed)
        self.template = _load_template(folder, chat_template, config)
        self.lines = LineTokenizer(self.tokenizer, line_cache_tokens)

    # ---- keys ------------------------------------------------------------------------------------

    def keys_for_ids(self, ids: Sequence[int] | np.ndarray) -> EngineKeys:
        """Keys of a prompt given as token ids."""
        arr = np.ascontiguousarray(ids, dtype=np.uint32)
        return EngineKeys(len(arr), native.engine_block_hashes(arr, self.block_size, self.parent), self.block_size)

    def token_ids(self, kind: str, body: Mapping[str, Any]) -> list[int] | None:
        """The prompt's token ids as vLLM computes them for a "completions" or "chat" body, or
        None when pylb cannot reproduce them (a batch of prompts, non-text content, a template
        error)."""
        ids = self._ids(kind, body)
        return None if ids is None else ids.tolist()

    def keys_for(self, kind: str, body: Mapping[str, Any]) -> EngineKeys | None:
        """Engine keys of an OpenAI request body ("completions" or "chat"), or None (see
        `token_ids`). Pure CPU work; the proxy runs it in a thread."""
        ids = self._ids(kind, body)
        return None if ids is None else self.keys_for_ids(ids)

    def _ids(self, kind: str, body: Mapping[str, Any]) -> np.ndarray | None:
        """`token_ids` as uint32 (text is tokenized through the line cache)."""
        if kind == "completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # a batch of one
            if isinstance(prompt, str):
                return self.lines.encode(prompt, add_special_tokens=True)
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in prompt):
                return np.asarray(prompt, dtype=np.uint32)
            return None
        if kind == "chat":
            text = self.render_chat(body.get("messages"), body.get("tools"))
            if text is None:
                return None
            return self.lines.encode(text, add_special_tokens=False)
        return None

    # ---- chat ------------------------------------------------------------------------------------

    def render_chat(self, messages: Any, tools: Any = None) -> str | None:
        """The chat prompt text vLLM renders for `messages` (None when not reproducible)."""
        if self.template is None or not isinstance(messages, list) or not messages:
            return None
        conv = []
        for m in messages:
            if not isinstance(m, dict):
                return None
            content = m.get("content")
            if isinstance(content, list):
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        return None
                    texts.append(part["text"])
                m = {**m, "content": "\n".join(texts)}
            conv.append(m)
        try:
            return str(self.template.render(messages=conv, tools=tools, add_generation_prompt=True, **self.special_tokens))
        except Exception:  # a template that raises (raise_exception) or fails on this input
            return None


def _token_text(v: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken-like {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _load_template(folder: Path, chat_template: str | Path | None, config: Mapping[str, Any]) -> Any:
    """The compiled chat template (None when the model has none: chat requests are not keyed)."""
    source: str | None = None
    if chat_template is not None:
        try:
            source = Path(chat_template).read_text(encoding="utf-8")
        except OSError as exc:
            raise EngineKeyerError(f"cannot read the chat template {str(chat_template)!r}: {exc}") from None
    elif (folder / "chat_template.jinja").is_file():
        source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(config.get("chat_template"), str):
        source = config["chat_template"]
    if source is None:
        return None
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise EngineKeyerError("chat templates need `jinja2`: pip install 'pylb[tokenizer]'") from None

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise EngineKeyerError(f"the chat template does not compile: {exc}") from None
