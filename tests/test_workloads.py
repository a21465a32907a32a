"""Workloads: synthetic generators (determinism, prefix structure, skew), the Azure CSV loader,
and the trace dispatcher. The real Azure trace is used when ../shared/traces is present."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from pylb.workload import azure, loaders, synthetic
from pylb.workload.types import BYTES_PER_TOKEN, WorkloadRequest

TRACES = Path(os.environ.get("PYLB_TRACES", Path(__file__).resolve().parents[1] / ".." / "shared" / "traces"))
AZURE_TRACE = TRACES / "AzureLLMInferenceTrace_conv.csv"


def texts(workload: list[WorkloadRequest]) -> list[str]:
    return [r.prompt_text() for r in workload]


def assert_well_formed(workload: list[WorkloadRequest]) -> None:
    """Arrival order, unique ids, ASCII/JSON-safe text of exactly 4 bytes per token."""
    assert [r.arrival_s for r in workload] == sorted(r.arrival_s for r in workload)
    assert len({r.request_id for r in workload}) == len(workload)
    for r in workload:
        text = r.prompt_text()
        assert text.isascii()
        assert len(text.encode()) == BYTES_PER_TOKEN * r.prompt_tokens
        assert json.dumps(text) == f'"{text}"'  # nothing to escape


# ---- text ----------------------------------------------------------------------------------------


def test_token_text_is_deterministic_prefix_closed_and_keyed() -> None:
    a = synthetic.token_text("k", 100)
    assert a == synthetic.token_text("k", 100)
    assert len(a) == 400 and a.isascii()
    assert synthetic.token_text("k", 40) == a[:160]
    assert synthetic.token_text("other", 100)[:64] != a[:64]
    assert synthetic.token_text("k", 0) == ""
    # Each token is a space and three letters.
    words = a.split(" ")[1:]
    assert len(words) == 100 and all(len(w) == 3 and w.isalpha() for w in words)


# ---- multi-turn ----------------------------------------------------------------------------------


def test_multi_turn_shape_and_lengths() -> None:
    w = synthetic.multi_turn(sessions=7, turns=4, system_tokens=64, user_tokens=16, answer_tokens=8, seed=1)
    assert len(w) == 28
    assert_well_formed(w)
    for r in w:
        n = int(r.request_id.rsplit("-t", 1)[1])
        assert r.prompt_tokens == 64 + n * 16 + (n - 1) * 8
        assert r.output_tokens == 8
        assert r.session_id == r.request_id.rsplit("-t", 1)[0]
    assert w[0].arrival_s == 0.0


def test_multi_turn_each_turn_extends_the_previous() -> None:
    w = synthetic.multi_turn(sessions=5, turns=5, system_tokens=32, user_tokens=8, answer_tokens=8, seed=2)
    by_session: dict[str, list[WorkloadRequest]] = {}
    for r in w:
        by_session.setdefault(r.session_id or "", []).append(r)
    system = w[0].prompt_text()[: 32 * BYTES_PER_TOKEN]
    for turns in by_session.values():
        assert [r.request_id.rsplit("-t", 1)[1] for r in turns] == ["1", "2", "3", "4", "5"]  # in order
        for prev, nxt in zip(turns, turns[1:]):
            assert nxt.arrival_s >= prev.arrival_s
            assert nxt.prompt_text().startswith(prev.prompt_text())
            assert len(nxt.prompt_text()) > len(prev.prompt_text())
        assert turns[0].prompt_text().startswith(system)  # one shared system prompt
    firsts = [turns[0].prompt_text() for turns in by_session.values()]
    assert len(set(firsts)) == len(firsts)  # but distinct user messages


def test_multi_turn_is_deterministic_under_a_seed() -> None:
    kw = dict(sessions=6, turns=3, system_tokens=16, user_tokens=4, answer_tokens=4)
    a, b = synthetic.multi_turn(seed=5, **kw), synthetic.multi_turn(seed=5, **kw)
    c = synthetic.multi_turn(seed=6, **kw)
    assert [(r.request_id, r.arrival_s) for r in a] == [(r.request_id, r.arrival_s) for r in b]
    assert texts(a) == texts(b)
    assert [r.arrival_s for r in a] != [r.arrival_s for r in c]
    assert texts(a)[0] != texts(c)[0]


def test_multi_turn_arrival_rate() -> None:
    w = synthetic.multi_turn(sessions=2000, turns=1, rate=4.0, system_tokens=0, user_tokens=1, answer_tokens=1)
    assert 2000 / w[-1].arrival_s == pytest.approx(4.0, rel=0.1)
    z = synthetic.multi_turn(sessions=3, turns=3, think_time_s=0, system_tokens=0, user_tokens=1, answer_tokens=1)
    assert len({(r.session_id, r.arrival_s) for r in z}) == 3  # no think time: a session's turns arrive together


def test_multi_turn_groups_default_is_unchanged() -> None:
    # Digest of this workload as generated before `groups` existed (commit 8b9f67b).
    import hashlib

    w = synthetic.multi_turn(sessions=6, turns=3, system_tokens=40, user_tokens=8, answer_tokens=4, rate=2.0, think_time_s=1.0, seed=3)
    h = hashlib.sha256()
    for r in w:
        h.update(f"{r.request_id}|{r.arrival_s!r}|{r.prompt_tokens}|{r.output_tokens}|{r.session_id}|{r.prompt_text()}\n".encode())
    assert h.hexdigest() == "f1cfd224aa94a8e1d93ec8b42a6d3a07be8df9a8814255ff48eb6f325afe9589"


def test_multi_turn_groups_share_one_system_prompt_each() -> None:
    kw = dict(sessions=12, turns=2, system_tokens=32, user_tokens=8, answer_tokens=4, seed=4)
    one, three = synthetic.multi_turn(**kw), synthetic.multi_turn(groups=3, **kw)
    assert [(r.request_id, r.arrival_s) for r in one] == [(r.request_id, r.arrival_s) for r in three]  # same arrivals
    assert_well_formed(three)
    system = {r.session_id: r.prompt_text()[: 32 * BYTES_PER_TOKEN] for r in three}
    for sid, text in system.items():
        s = int(sid.removeprefix("mt-s"))
        assert text == system[f"mt-s{s % 3}"]  # session s uses prompt s mod 3
    assert len(set(system.values())) == 3
    assert len({r.prompt_text()[: 32 * BYTES_PER_TOKEN] for r in one}) == 1
    with pytest.raises(ValueError, match="groups"):
        synthetic.multi_turn(groups=0)
    assert loaders.load_workload("synthetic:multi-turn:groups=3,sessions=12,turns=2,system_tokens=32,"
                                 "user_tokens=8,answer_tokens=4,seed=4")[5].prompt_text() == three[5].prompt_text()  # fmt: skip


@pytest.mark.parametrize(
    "kwargs",
    [{"sessions": 0}, {"turns": 0}, {"rate": 0}, {"rate": -1.0}, {"user_tokens": 0}, {"think_time_s": -1.0},
     {"rate": float("nan")}],
)  # fmt: skip
def test_multi_turn_rejects_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        synthetic.multi_turn(**kwargs)


# ---- zipf ----------------------------------------------------------------------------------------


def test_zipf_structure_and_skew() -> None:
    w = synthetic.zipf_prefixes(requests=3000, prefixes=50, prefix_tokens=32, suffix_tokens=8, zipf_s=1.2, seed=3)
    assert len(w) == 3000
    assert_well_formed(w[:200])
    prefix_bytes = 32 * BYTES_PER_TOKEN
    counts = Counter(t[:prefix_bytes] for t in texts(w))
    assert len(counts) <= 50
    ranked = [n for _, n in counts.most_common()]
    # Zipf(1.2) over 50 prefixes: the top prefix has p1 = 1/H(50,1.2) ~ 0.28; the top 5 hold ~ 0.6.
    assert ranked[0] / 3000 == pytest.approx(0.28, abs=0.04)
    assert sum(ranked[:5]) / 3000 > 0.5
    assert ranked[0] > 10 * ranked[len(ranked) // 2]
    suffixes = {t[prefix_bytes:] for t in texts(w)}
    assert len(suffixes) == 3000  # every suffix unique


def test_zipf_uniform_when_s_is_zero() -> None:
    w = synthetic.zipf_prefixes(requests=2000, prefixes=10, prefix_tokens=8, suffix_tokens=1, zipf_s=0.0, seed=4)
    counts = Counter(t[:32] for t in texts(w))
    assert len(counts) == 10
    assert max(counts.values()) < 1.4 * min(counts.values())


def test_zipf_is_deterministic_under_a_seed() -> None:
    a = synthetic.zipf_prefixes(requests=50, prefix_tokens=8, suffix_tokens=4, seed=9)
    b = synthetic.zipf_prefixes(requests=50, prefix_tokens=8, suffix_tokens=4, seed=9)
    c = synthetic.zipf_prefixes(requests=50, prefix_tokens=8, suffix_tokens=4, seed=10)
    assert texts(a) == texts(b) and [r.arrival_s for r in a] == [r.arrival_s for r in b]
    assert texts(a) != texts(c)
    assert 49 / a[-1].arrival_s == pytest.approx(5.0, rel=0.5)  # default rate 5 req/s


def test_zipf_without_prefix() -> None:
    w = synthetic.zipf_prefixes(requests=10, prefix_tokens=0, suffix_tokens=3)
    assert_well_formed(w)
    assert all(r.prompt_tokens == 3 for r in w)


# ---- azure ---------------------------------------------------------------------------------------

AZURE_SMALL = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.0000000,1,1
2023-11-16 18:16:46.6805901,20,7
"""


def test_azure_parses_arrivals_and_lengths(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text(AZURE_SMALL)
    w = azure.load_azure(path)
    assert [r.request_id for r in w] == ["azure-0", "azure-1", "azure-2", "azure-3"]
    assert [r.arrival_s for r in w] == pytest.approx([0.0, 4.314579, 4.31941, 60.0000001], abs=1e-9)
    assert [(r.prompt_tokens, r.output_tokens) for r in w] == [(374, 44), (396, 109), (1, 1), (20, 7)]
    assert_well_formed(w)
    assert len({t[:64] for t in texts(w)}) == 4  # no shared prefixes
    assert texts(w) == texts(azure.load_azure(path))  # deterministic
    assert [r.request_id for r in azure.load_azure(path, limit=2)] == ["azure-0", "azure-1"]


def test_azure_sorts_and_accepts_column_order(tmp_path: Path) -> None:
    path = tmp_path / "b.csv"
    path.write_text(
        "GeneratedTokens,TIMESTAMP,ContextTokens\n"
        "5,2024-01-01T00:00:10,100\n"
        "\n"
        "6,2024-01-01T00:00:00.5,200\n"
    )
    w = azure.load_azure(path)
    assert [(r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in w] == [
        ("azure-1", 0.0, 200, 6),
        ("azure-0", 9.5, 100, 5),
    ]


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,12,x\n", r":2: field GeneratedTokens.*'x'"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1,2\n2023-11-16 18:15:46,-3,2\n",
         r":3: field ContextTokens.*'-3'"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n", r":2: field TIMESTAMP.*'yesterday'"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-02-30 00:00:00,1,2\n", r":2: field TIMESTAMP"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1\n", r":2: expected 3 fields, got 2"),
        ("TIMESTAMP,Context,GeneratedTokens\n2023-11-16 18:15:46,1,2\n", r":1: header lacks column\(s\) ContextTokens"),
        ("", r"empty file"),
    ],
)  # fmt: skip
def test_azure_malformed_names_line_and_field(tmp_path: Path, body: str, where: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(ValueError, match=where):
        azure.load_azure(path)


def test_real_azure_trace() -> None:
    if not AZURE_TRACE.is_file():
        pytest.skip(f"Azure trace not found at {AZURE_TRACE} (set PYLB_TRACES)")
    w = loaders.load_trace(AZURE_TRACE)
    assert len(w) == 19_366
    assert w[-1].arrival_s == pytest.approx(3502, abs=1)
    assert sum(r.prompt_tokens for r in w) / len(w) == pytest.approx(1155, abs=1)
    assert sum(r.output_tokens for r in w) / len(w) == pytest.approx(211, abs=1)
    assert max(r.prompt_tokens for r in w) == 14_050
    assert_well_formed(w[:50] + w[-50:])
    assert len(loaders.load_trace(AZURE_TRACE, limit=100)) == 100


# ---- dispatch ------------------------------------------------------------------------------------


def test_load_trace_dispatches_by_extension(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    csv_path = tmp_path / "t.CSV"
    csv_path.write_text(AZURE_SMALL)
    assert len(loaders.load_trace(csv_path, limit=3)) == 3

    calls = []

    def fake_mooncake(path: object, limit: int | None = None) -> list[WorkloadRequest]:
        calls.append((path, limit))
        return []

    import types

    monkeypatch.setitem(__import__("sys").modules, "pylb.workload.mooncake", types.SimpleNamespace(load_mooncake=fake_mooncake))
    assert loaders.load_trace(tmp_path / "m.jsonl", limit=7) == []
    assert calls == [(tmp_path / "m.jsonl", 7)]

    with pytest.raises(ValueError, match=r"t\.parquet.*unknown trace format '\.parquet'"):
        loaders.load_trace(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="no extension"):
        loaders.load_trace(tmp_path / "trace")


def test_load_workload_synthetic_specs() -> None:
    w = loaders.load_workload("synthetic:zipf:requests=30, prefixes=3,zipf_s=0.5,seed=2", limit=20)
    assert len(w) == 20
    assert texts(w) == texts(synthetic.zipf_prefixes(requests=30, prefixes=3, zipf_s=0.5, seed=2)[:20])
    assert len(loaders.load_workload("synthetic:multi-turn")) == 500  # defaults: 100 sessions x 5 turns
    assert loaders.parse_synthetic("synthetic:multi-turn:rate=2") == ("multi-turn", {"rate": 2.0})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("synthetic:nope", "unknown synthetic workload 'nope'"),
        ("synthetic:zipf:bogus=1", "unknown parameter 'bogus'"),
        ("synthetic:zipf:requests=many", "parameter requests must be int, got 'many'"),
        ("synthetic:zipf:requests", "expected key=value"),
        ("synthetic:zipf:rate=-2", "synthetic:zipf: rate must be"),
    ],
)
def test_load_workload_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        loaders.load_workload(spec)


# ---- synthetic:sessions (the regime matrix's generator) ------------------------------------------


def test_sessions_knobs_shape_the_workload() -> None:
    from pylb.workload.synthetic import sessions

    single = sessions(requests=200, reuse_share=0.0, agent_share=0.0, shared_depth=0, seed=1)
    assert len(single) == 200 and all(r.request_id.endswith("-t1") for r in single)
    assert [r.arrival_s for r in single] == sorted(r.arrival_s for r in single)
    agents = sessions(requests=300, reuse_share=0.0, agent_share=1.0, agent_turns=8.0, agent_append_tokens=32,
                      agent_output_tokens=7, shared_depth=2, shared_tokens=64, fanout=1, seed=2)  # fmt: skip
    by_session: dict[str, list] = {}
    for r in agents:
        by_session.setdefault(r.session_id, []).append(r)
    steps = [rs for rs in by_session.values() if len(rs) > 1]
    assert steps and sum(len(rs) for rs in by_session.values()) / len(by_session) > 3  # loops, not single requests
    for rs in steps:
        rs.sort(key=lambda r: int(r.request_id.rsplit("-t", 1)[1]))
        for prev, nxt in zip(rs, rs[1:]):
            assert nxt.prompt_text().startswith(prev.prompt_text())  # each step extends the last
            assert nxt.prompt_tokens == prev.prompt_tokens + 32 and nxt.output_tokens == 7
    shared = {r.prompt_text()[: 2 * 64 * 4] for r in agents}
    assert len(shared) == 1  # fanout 1: every prompt starts with the same two shared levels
    capped = sessions(requests=100, prompt_tokens=5000, max_prompt_tokens=300, seed=3)
    assert max(r.prompt_tokens for r in capped) == 300 and all(len(r.prompt_text()) == 4 * r.prompt_tokens for r in capped)


def test_sessions_bad_knobs_name_the_field() -> None:
    from pylb.workload.loaders import load_workload

    with pytest.raises(ValueError, match="reuse_share \\+ agent_share"):
        load_workload("synthetic:sessions:reuse_share=0.7,agent_share=0.5")
    with pytest.raises(ValueError, match="fanout"):
        load_workload("synthetic:sessions:fanout=0")
    assert len(load_workload("synthetic:sessions:requests=50,agent_share=0.2")) == 50
