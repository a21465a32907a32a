"""Mooncake JSONL loader: ids become text that keeps the trace's prefix structure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pylb import native
from pylb.workload.mooncake import BLOCK_BYTES, MooncakeFormatError, block_text, load_mooncake, mooncake_prompt
from pylb.workload.types import tokens_in

LINES = [
    {"timestamp": 0, "input_length": 1200, "output_length": 10, "hash_ids": [0, 1, 2]},
    {"timestamp": 0, "input_length": 1500, "output_length": 0, "hash_ids": [0, 1, 3]},
    {"timestamp": 2500, "input_length": 600, "output_length": 7, "hash_ids": [0, 4]},
    {"timestamp": 3001, "input_length": 512, "output_length": 3, "hash_ids": [5]},
]


def write(tmp_path: Path, lines: list, name: str = "t.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps(x) + "\n" if not isinstance(x, str) else x + "\n" for x in lines))
    return p


def test_fields_lengths_and_arrivals(tmp_path: Path) -> None:
    reqs = load_mooncake(write(tmp_path, LINES))
    assert [r.request_id for r in reqs] == [f"mooncake-{i}" for i in range(4)]
    assert [r.arrival_s for r in reqs] == [0.0, 0.0, 2.5, 3.001]
    assert [r.prompt_tokens for r in reqs] == [1200, 1500, 600, 512]
    assert [r.output_tokens for r in reqs] == [10, 1, 7, 3]  # at least one token
    for r, line in zip(reqs, LINES):
        text = r.prompt_text()
        assert text.isascii()
        assert len(text.encode()) == line["input_length"] * 4
        assert tokens_in(len(text)) == r.prompt_tokens
        assert r.prompt_text() == text  # deterministic


def test_equal_ids_give_equal_text_and_different_ids_differ_at_once(tmp_path: Path) -> None:
    a, b, c, _ = (r.prompt_text().encode() for r in load_mooncake(write(tmp_path, LINES)))
    # a and b share ids [0, 1]: exactly 2 * 2048 bytes in common
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert 2 * BLOCK_BYTES <= common < 2 * BLOCK_BYTES + 16
    assert a[:BLOCK_BYTES] == c[:BLOCK_BYTES] and a[BLOCK_BYTES : BLOCK_BYTES + 16] != c[BLOCK_BYTES : BLOCK_BYTES + 16]
    # the structure survives hashing at the router's 64-byte blocks and at engine block sizes
    for block in (64, 512, 2048):
        ha, hb = native.block_hashes(a, block), native.block_hashes(b, block)
        shared = sum(1 for x, y in zip(ha, hb) if x == y)
        assert shared == 2 * BLOCK_BYTES // block


def test_block_texts_are_distinct_and_sized() -> None:
    texts = {block_text(i) for i in range(5000)}
    assert len(texts) == 5000
    assert {len(t) for t in texts} == {BLOCK_BYTES}
    # a prompt whose last block is partial is cut, not padded
    assert mooncake_prompt([7, 8], 600) == block_text(7) + block_text(8)[: 88 * 4]


def test_limit_and_blank_lines(tmp_path: Path) -> None:
    p = write(tmp_path, [LINES[0], "", LINES[1], LINES[2]])
    assert len(load_mooncake(p)) == 3
    assert [r.prompt_tokens for r in load_mooncake(p, limit=2)] == [1200, 1500]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r":1: not valid JSON"),
        ({"timestamp": 0, "input_length": 10, "output_length": 1}, r":1: missing field 'hash_ids'"),
        ({"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": []}, r"input_length must be an integer >= 1, got 0"),
        ({"timestamp": -5, "input_length": 10, "output_length": 1, "hash_ids": [1]}, r"timestamp must be"),
        ({"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [1]}, r"needs 2 hash_ids"),
        ({"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": ["x"]}, r"hash_ids must be a list of integers"),
    ],
)
def test_malformed_lines_name_line_and_field(tmp_path: Path, line: object, message: str) -> None:
    with pytest.raises(MooncakeFormatError, match=message):
        load_mooncake(write(tmp_path, [line]))


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError):
        load_mooncake("/nonexistent/trace.jsonl")


def test_real_trace_head(mooncake_trace: Path) -> None:
    path = mooncake_trace
    reqs = load_mooncake(path, limit=50)
    assert len(reqs) == 50
    texts = [r.prompt_text().encode() for r in reqs]
    assert all(len(t) == 4 * r.prompt_tokens for t, r in zip(texts, reqs))
    assert len({t[:BLOCK_BYTES] for t in texts}) == 1  # every request starts with block id 0
