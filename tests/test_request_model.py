"""pylb.router.request: OpenAI request bodies -> RoutingRequest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pylb import native
from pylb.router.prefix import short_key
from pylb.router.request import CHAT, COMPLETIONS, RequestError, RequestLimits, build_request, parse_json_body, canonical_chat_text

PROMPT = "The quick brown fox jumps over the lazy dog. " * 8  # 360 bytes: 5 full 64-byte blocks


def req(kind: str, body: dict, **kw):  # noqa: ANN201
    return build_request(kind, body, "r1", 1.5, RequestLimits(**kw))


def test_completion_string_prompt() -> None:
    r = req(COMPLETIONS, {"model": "m", "prompt": PROMPT, "max_tokens": 7, "stream": True, "priority": 3})
    assert r.request_id == "r1" and r.arrival == 1.5 and r.model == "m" and r.stream is True
    assert r.prompt_tokens == 90  # ceil(360 / 4)
    assert r.max_tokens == 7
    assert r.priority == -3  # vLLM: lower value first; pylb: larger is more urgent
    np.testing.assert_array_equal(r.block_hashes, native.block_hashes(PROMPT.encode(), 64))
    assert len(r.block_hashes) == 5 and r.block_hashes.dtype == np.uint64


def test_completion_defaults() -> None:
    r = req(COMPLETIONS, {"prompt": "hello"})
    assert (r.max_tokens, r.stream, r.priority, r.model) == (16, False, 0, "")
    assert r.prompt_tokens == 2 and len(r.block_hashes) == 0
    assert req(COMPLETIONS, {"prompt": "x", "max_tokens": None, "stream": None, "model": None}).max_tokens == 16
    assert req(COMPLETIONS, {"prompt": "x"}, completions_default_max_tokens=5).max_tokens == 5
    assert req(COMPLETIONS, {"prompt": "x", "max_tokens": 4.0}).max_tokens == 4  # JSON 4.0 is an integer


def test_shared_prefix_shares_leading_hashes() -> None:
    a = req(COMPLETIONS, {"prompt": PROMPT + "first question"}).block_hashes
    b = req(COMPLETIONS, {"prompt": PROMPT + "another one, longer than the first"}).block_hashes
    np.testing.assert_array_equal(a[:5], b[:5])


def test_token_id_prompts_hash_as_uint32_in_16_token_blocks() -> None:
    ids = list(range(1000, 1040))
    r = req(COMPLETIONS, {"prompt": ids})
    assert r.prompt_tokens == 40
    np.testing.assert_array_equal(r.block_hashes, native.block_hashes(np.asarray(ids, dtype=np.uint32), 16))
    assert len(r.block_hashes) == 2
    assert len(req(COMPLETIONS, {"prompt": ids}, block_chars=128).block_hashes) == 1  # 32 ids per block


def test_batches_route_by_the_first_prompt_and_count_all() -> None:
    r = req(COMPLETIONS, {"prompt": [PROMPT, "short", "also short"], "max_tokens": 10})
    np.testing.assert_array_equal(r.block_hashes, native.block_hashes(PROMPT.encode(), 64))
    assert r.prompt_tokens == 90 + 2 + 3
    assert r.max_tokens == 30
    ids = [[1] * 20, [2] * 5]
    r = req(COMPLETIONS, {"prompt": ids, "max_tokens": 2, "n": 2})
    np.testing.assert_array_equal(r.block_hashes, native.block_hashes(np.ones(20, dtype=np.uint32), 16))
    assert (r.prompt_tokens, r.max_tokens) == (25, 8)


def test_chat_rendering_extends_turn_by_turn() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    turn1 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris?"}]
    reply = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
    turn2 = [*turn1, reply, {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    turn3 = [*turn2, {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    texts = [canonical_chat_text(t, tools) for t in (turn1, turn2, turn3)]
    assert texts[1].startswith(texts[0]) and texts[2].startswith(texts[1])
    assert texts[0].startswith("<|tools|>\n")  # tool definitions first
    assert '<|tool_call|>get_weather({"city":"Paris"})' in texts[1]
    assert "<|tool_result|>c1" in texts[1]
    assert "<|image|>http://x/y.png" in texts[2]
    h = [req(CHAT, {"messages": t, "tools": tools}).block_hashes for t in (turn1, turn2, turn3)]
    for a, b in zip(h, h[1:]):
        np.testing.assert_array_equal(b[: len(a)], a)


def test_prompt_hash_is_xxh3_of_the_hashed_prompt() -> None:
    # text: the UTF-8 bytes, whatever the block size
    r = req(COMPLETIONS, {"prompt": PROMPT})
    assert r.prompt_hash == native.xxh3_64(PROMPT.encode())
    assert req(COMPLETIONS, {"prompt": PROMPT}, block_chars=128).prompt_hash == r.prompt_hash
    # token ids: the uint32 ids' bytes (what block_hashes reads)
    ids = list(range(1000, 1040))
    r = req(COMPLETIONS, {"prompt": ids})
    assert r.prompt_hash == native.xxh3_64(np.asarray(ids, dtype=np.uint32).tobytes())
    # a batch: the first prompt's, like its block hashes
    assert req(COMPLETIONS, {"prompt": ["short one", PROMPT]}).prompt_hash == native.xxh3_64(b"short one")
    assert req(COMPLETIONS, {"prompt": [[7, 8, 9], [1]]}).prompt_hash == native.xxh3_64(np.asarray([7, 8, 9], dtype=np.uint32))
    # chat: the canonical rendering
    msgs = [{"role": "user", "content": "hi"}]
    assert req(CHAT, {"messages": msgs}).prompt_hash == native.xxh3_64(canonical_chat_text(msgs).encode())
    # surrogates are hashed as the bytes that were block-hashed
    assert req(COMPLETIONS, {"prompt": "a\ud800b"}).prompt_hash == native.xxh3_64("a\ud800b".encode("utf-8", "surrogatepass"))


def test_short_prompts_that_differ_get_different_keys() -> None:
    # shorter than one 64-byte block: no block hash, so the prompt hash is the router's key
    a = req(COMPLETIONS, {"prompt": "What is the capital of France?"})
    b = req(COMPLETIONS, {"prompt": "What is the capital of Norway?"})  # same length, same token estimate
    assert len(a.block_hashes) == len(b.block_hashes) == 0 and a.prompt_tokens == b.prompt_tokens
    assert a.prompt_hash is not None and b.prompt_hash is not None and a.prompt_hash != b.prompt_hash
    assert short_key(a) != short_key(b)
    assert short_key(a) == short_key(req(COMPLETIONS, {"prompt": "What is the capital of France?"}))
    c = req(CHAT, {"messages": [{"role": "user", "content": "hi"}]})
    d = req(CHAT, {"messages": [{"role": "user", "content": "yo"}]})
    assert c.prompt_hash != d.prompt_hash and short_key(c) != short_key(d)
    assert req(COMPLETIONS, {"prompt": [1, 2, 3]}).prompt_hash != req(COMPLETIONS, {"prompt": [1, 2, 4]}).prompt_hash


def test_chat_turns_still_extend_with_prompt_hash() -> None:
    turn1 = [{"role": "system", "content": "You are terse. " * 10}, {"role": "user", "content": "Weather in Paris?"}]
    turn2 = [*turn1, {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "And tomorrow?"}]
    r1, r2 = (req(CHAT, {"messages": t}) for t in (turn1, turn2))
    assert len(r1.block_hashes) >= 2
    np.testing.assert_array_equal(r2.block_hashes[: len(r1.block_hashes)], r1.block_hashes)
    assert r1.prompt_hash == native.xxh3_64(canonical_chat_text(turn1).encode())
    assert r2.prompt_hash == native.xxh3_64(canonical_chat_text(turn2).encode()) != r1.prompt_hash


def test_chat_render_exact() -> None:
    msgs = [{"role": "user", "name": "ann", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert canonical_chat_text(msgs) == "<|user:ann|>\nhi\n<|assistant|>\nyo\n"
    # tool definitions are canonical JSON: key order does not matter
    t1 = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    t2 = [{"function": {"parameters": {}, "name": "f"}, "type": "function"}]
    assert canonical_chat_text(msgs, t1) == canonical_chat_text(msgs, t2)


def test_chat_tokens_and_max_tokens() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 100}]}
    r = req(CHAT, body)
    assert r.prompt_tokens == -(-len(canonical_chat_text(body["messages"]).encode()) // 4)
    assert r.max_tokens == 1024  # chat_default_max_tokens
    assert req(CHAT, {**body, "max_tokens": 9}).max_tokens == 9
    assert req(CHAT, {**body, "max_tokens": 9, "max_completion_tokens": 3}).max_tokens == 3
    assert req(CHAT, {**body, "max_tokens": 9, "n": 3}).max_tokens == 27
    uni = req(CHAT, {"messages": [{"role": "user", "content": "é" * 10}]})
    assert uni.prompt_tokens == -(-len(canonical_chat_text([{"role": "user", "content": "é" * 10}]).encode()) // 4)


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        (COMPLETIONS, {}, "prompt"),
        (COMPLETIONS, {"prompt": ""}, "prompt"),
        (COMPLETIONS, {"prompt": []}, "prompt"),
        (COMPLETIONS, {"prompt": 5}, "prompt"),
        (COMPLETIONS, {"prompt": {"a": 1}}, "prompt"),
        (COMPLETIONS, {"prompt": [1, "a"]}, "prompt"),
        (COMPLETIONS, {"prompt": [1, True]}, "prompt"),
        (COMPLETIONS, {"prompt": [-1]}, "prompt"),
        (COMPLETIONS, {"prompt": [2**32]}, "prompt"),
        (COMPLETIONS, {"prompt": ["a", 3]}, "prompt"),
        (COMPLETIONS, {"prompt": ["a", ""]}, "prompt"),
        (COMPLETIONS, {"prompt": [[1], []]}, "prompt"),
        (COMPLETIONS, {"prompt": "a", "max_tokens": "10"}, "max_tokens"),
        (COMPLETIONS, {"prompt": "a", "max_tokens": 0}, "max_tokens"),
        (COMPLETIONS, {"prompt": "a", "max_tokens": 1.5}, "max_tokens"),
        (COMPLETIONS, {"prompt": "a", "max_tokens": True}, "max_tokens"),
        (COMPLETIONS, {"prompt": "a", "stream": "yes"}, "stream"),
        (COMPLETIONS, {"prompt": "a", "model": 3}, "model"),
        (COMPLETIONS, {"prompt": "a", "priority": "high"}, "priority"),
        (COMPLETIONS, {"prompt": "a", "n": 0}, "n"),
        (CHAT, {}, "messages"),
        (CHAT, {"messages": []}, "messages"),
        (CHAT, {"messages": "hi"}, "messages"),
        (CHAT, {"messages": ["hi"]}, "messages"),
        (CHAT, {"messages": [{"content": "hi"}]}, "messages"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages"),
        (CHAT, {"messages": [{"role": "user", "content": [5]}]}, "messages"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
        (CHAT, {"messages": [{"role": "assistant", "tool_calls": "x"}]}, "messages"),
        (CHAT, {"messages": [{"role": "assistant", "tool_calls": [{"id": 1}]}]}, "messages"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "tools": {"a": 1}}, "tools"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -2}, "max_completion_tokens"),
    ],
)
def test_malformed_fields_are_named(kind: str, body: dict, field: str) -> None:
    with pytest.raises(RequestError) as info:
        req(kind, body)
    assert info.value.field == field
    assert info.value.message


def test_parse_json_body() -> None:
    assert parse_json_body(b'{"a": 1}') == {"a": 1}
    for bad, what in [(b"{", "not valid JSON"), (b"[1]", "must be a JSON object"), (b"\xff\xfe", "UTF-8"), (b"", "not valid JSON"), (b"[" * 100000 + b"]" * 100000, "nested too deeply")]:
        with pytest.raises(RequestError, match=what) as info:
            parse_json_body(bad)
        assert info.value.field == "body"


def test_lone_surrogates_do_not_crash() -> None:
    body = json.loads('{"prompt": "\\ud800 abc"}')
    assert req(COMPLETIONS, body).prompt_tokens >= 1
