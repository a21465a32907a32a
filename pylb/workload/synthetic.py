"""Synthetic workloads with known prefix structure, and the deterministic text they are made of.

Design
------
Text. Every prompt is built from *word tokens*: 4-byte ASCII strings, a space and three lowercase
letters (" the", " cat", ...), 256 of them, so one byte of entropy picks one token. A text segment
of T tokens is named by a string key and is the 256-word image of `shake_128(key)`'s first T bytes:
the same key always gives the same text, on any machine and Python version, and two different
keys share no block of useful size (an equal 16-token run has probability 2^-128). The text is
therefore ASCII (JSON-safe, no escapes) and exactly `BYTES_PER_TOKEN * T` bytes, which is what
pylb's simulated replicas count as T tokens; for a real BPE tokenizer a space-prefixed common
English word is about one token too, so lengths stay close on a real vLLM. Prompts are
concatenations of segments, so shared prefixes are shared text byte for byte.

Multi-turn sessions (`multi_turn`): S sessions of T turns each, under G shared system prompts
(session s uses system prompt s mod G; G = 1, the default, is one prompt shared by all). Turn 1's prompt is `system + user_1`; turn n+1's prompt is turn n's prompt + the
previous answer (`answer_tokens` of synthetic text standing for what the model said) + a new
user message, so each turn's text extends the previous turn's text and a replica that served
turn n holds all of turn n+1's prompt except the last answer and user message. Tokens of turn n:
`system_tokens + n*user_tokens + (n-1)*answer_tokens`; every turn asks for `answer_tokens`.
Arrivals are open-loop: sessions start as a Poisson process of `rate` sessions per second, and
turn n+1 arrives an exponential think time (mean `think_time_s`) after turn n *arrives* (an
open-loop trace cannot know when the answer finished). The workload is sorted by arrival.

    parameter       default  meaning
    sessions        100      number of sessions S (>= 1)
    turns           5        turns per session T (>= 1)
    system_tokens   1024     length of each shared system prompt (>= 0)
    groups          1        number of distinct system prompts G (>= 1); session s uses s mod G
    user_tokens     128      length of each new user message (>= 1)
    answer_tokens   256      length of each answer: max_tokens of every turn, and the length of
                             the answer text carried into the next turn's prompt (>= 1)
    rate            1.0      session arrivals per second (Poisson, > 0)
    think_time_s    10.0     mean think time between turns of a session, seconds (>= 0)
    seed            0        RNG seed; also part of every text key

Zipf-popular prefixes (`zipf_prefixes`): P distinct prefixes of L tokens; prefix k (k = 1..P)
is chosen with probability proportional to 1 / k^s (Zipf with exponent s; s = 0 is uniform, and
around 1 is typical of popularity in caches and of shared system prompts); each request is its
prefix + a unique suffix, so a request can reuse exactly L tokens of cache. Arrivals: Poisson at
`rate` requests per second.

    parameter       default  meaning
    requests        1000     number of requests (>= 1)
    prefixes        100      number of distinct prefixes P (>= 1)
    prefix_tokens   2048     prefix length L (>= 0)
    suffix_tokens   256      unique suffix length (>= 1)
    zipf_s          1.1      Zipf exponent s (>= 0)
    output_tokens   128      max_tokens of every request (>= 1)
    rate            5.0      request arrivals per second (Poisson, > 0)
    seed            0        RNG seed; also part of every text key

Sessions with regime knobs (`sessions`): the workload shapes a router meets, one knob each.
Sessions start as a Poisson process; a session's prompts sit under a chain of `shared_depth`
shared prefixes of `shared_tokens` each (a tenant's system prompt, then an application's tool
specification, ...), where level k has `fanout` children under each level k-1 prefix, picked
Zipf(`zipf_s`) (so a few prefixes are hot and many are rare). Turn 1 is the shared chain + a
unique first message (lognormal, mean `prompt_tokens`, sigma `prompt_sigma`); every later turn
is the previous prompt + `append_tokens` (the answer and a new message), so the reuse share is
set by how many sessions continue and the reuse distance by the gap between turns. Three kinds
of session: a single request (share 1 - `reuse_share` - `agent_share`), a chat of 1 + a
geometric number of turns (mean `turns`, gap exponential with mean `think_time_s`), and a
tool-agent loop (share `agent_share`): mean `agent_turns` steps, `agent_think_s` apart (a tool
call's latency), each adding `agent_append_tokens` (a tool result) and asking for
`agent_output_tokens`. Prompts are cut at `max_prompt_tokens` (0: no cap; a cut prompt keeps
its prefix, so it still reuses). Session start rate = `rate` / (mean requests per session), so
`rate` is the mean request rate; the first `requests` requests by arrival are kept.

    parameter            default  meaning
    requests             1000     requests kept (>= 1)
    rate                 2.0      mean request arrivals per second (> 0)
    prompt_tokens        1024     mean unique tokens of a session's first message (>= 1)
    prompt_sigma         0.8      lognormal sigma of the first message's length (>= 0)
    shared_depth         1        levels of shared prefix above each session (>= 0)
    shared_tokens        1024     tokens per shared level (>= 1)
    fanout               8        prefixes per level under each parent (>= 1)
    zipf_s               1.0      Zipf exponent of the pick at each level (>= 0)
    reuse_share          0.7      share of sessions that are multi-turn chats (0..1)
    turns                4.0      mean turns of a chat (>= 1)
    think_time_s         20.0     mean gap between a chat's turns, seconds (>= 0)
    append_tokens        256      tokens a chat turn adds (>= 1)
    output_tokens        256      max_tokens of a chat or single request (>= 1)
    agent_share          0.0      share of sessions that are tool-agent loops (0..1 - reuse_share)
    agent_turns          12.0     mean steps of an agent loop (>= 1)
    agent_think_s        1.0      mean gap between agent steps, seconds (>= 0)
    agent_append_tokens  128      tokens an agent step adds (>= 1)
    agent_output_tokens  64       max_tokens of an agent step (>= 1)
    max_prompt_tokens    0        prompt cap in tokens (0: none)
    seed                 0        RNG seed; also part of every text key

The defaults live only in the functions' signatures; the CLI's `synthetic:NAME:key=value,...`
specs (`pylb.workload.loaders`) read them from there.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from functools import partial

import numpy as np

from .types import BYTES_PER_TOKEN, WorkloadRequest

# 256 distinct common three-letter English words, each with a leading space: one byte -> one token.
_WORDS = """
the and for are but not you all any can had her was one our out day get has him his how man new
now old see two way who boy did its let put say she too use act add age ago aid aim air arm art
ask bad bag bar bat bed bet big bit box bus buy car cat cut dog dry due ear eat egg end eye far
fat few fit fix fly fun gas gum gun guy hat hit hot ice ill job joy key kid lay leg lie lot low
mad map may mix mom net nor odd off oil own pay pen per pet pie pin pop pot raw red rid row run
sad sat sea set shy sit six sky son sun tax tea ten tie tip toe top toy try van war wet why win
yes yet zoo ant ape arc ash bay bee bin bow bud bug cab cap cow cry cub cup dam den dew dig dim
dip dot dug dye elf elm emu fan fee fig fin fog fox fur gap gel gem hay hen hip hog hop hub hug
hum hut ink inn ivy jam jar jaw jet jog jug kit lab lad lap law lid lip log mat mob mop mud mug
nap nest nut oak oar oat opt orb ore owl pad pal pan paw pea peg pit ply pod pub pun pup ram rat
ray rib rim rod rug rye sag saw sip sob sow spa spy sum tab tag tan tap tar tin ton tub tug urn
vat vet vow wax web wig wit wok yak yam yap yew zap zip
""".split()
_WORDS = [w for w in dict.fromkeys(_WORDS) if len(w) == 3][:256]
assert len(_WORDS) == 256, len(_WORDS)
_WORD_TABLE = np.frombuffer("".join(" " + w for w in _WORDS).encode("ascii"), dtype=np.uint32)
assert _WORD_TABLE.itemsize == BYTES_PER_TOKEN  # one word (with its space) per simulated token


def token_text(key: str, tokens: int) -> str:
    """Deterministic ASCII text of exactly `tokens * BYTES_PER_TOKEN` bytes named by `key`.

    Equal keys give equal text; the text of `n` tokens is a prefix of the text of `m > n` tokens
    under the same key.
    """
    if tokens <= 0:
        return ""
    picks = np.frombuffer(hashlib.shake_128(key.encode()).digest(tokens), dtype=np.uint8)
    return _WORD_TABLE[picks].tobytes().decode("ascii")


def _concat(segments: tuple[tuple[str, int], ...]) -> str:
    """Text of (key, tokens) segments, concatenated (the `make_text` of synthetic requests)."""
    return "".join(token_text(key, tokens) for key, tokens in segments)


def text_of(segments: tuple[tuple[str, int], ...]) -> partial[str]:
    """A `make_text` callable for a prompt made of (key, tokens) segments."""
    return partial(_concat, segments)


def _check(name: str, value: float, low: float, *, strict: bool = False) -> None:
    if not (value > low if strict else value >= low) or value == float("inf"):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")


def multi_turn(
    *,
    sessions: int = 100,
    turns: int = 5,
    system_tokens: int = 1024,
    user_tokens: int = 128,
    answer_tokens: int = 256,
    rate: float = 1.0,
    think_time_s: float = 10.0,
    seed: int = 0,
    groups: int = 1,
) -> list[WorkloadRequest]:
    """Multi-turn chat sessions under `groups` shared system prompts (see the module comment).

    Returns `sessions * turns` requests in arrival order; request ids are `mt-s{S}-t{N}` (turn
    numbers from 1) and `session_id` is `mt-s{S}`. Turn N+1's text starts with turn N's text.
    """
    _check("sessions", sessions, 1)
    _check("turns", turns, 1)
    _check("system_tokens", system_tokens, 0)
    _check("user_tokens", user_tokens, 1)
    _check("answer_tokens", answer_tokens, 1)
    _check("rate", rate, 0, strict=True)
    _check("think_time_s", think_time_s, 0)
    _check("groups", groups, 1)
    rng = np.random.default_rng(seed)
    starts = np.cumsum(rng.exponential(1.0 / rate, size=sessions))
    starts -= starts[0]  # the first session starts at 0
    thinks = rng.exponential(think_time_s, size=(sessions, max(turns - 1, 1))) if think_time_s > 0 else None
    out: list[WorkloadRequest] = []
    # One group keeps the original key, so groups=1 gives the same text as before groups existed.
    system_keys = [f"mt:{seed}:system"] if groups == 1 else [f"mt:{seed}:system:g{g}" for g in range(groups)]
    for s in range(sessions):
        segments: tuple[tuple[str, int], ...] = ((system_keys[s % groups], system_tokens),) if system_tokens else ()
        t = float(starts[s])
        for n in range(1, turns + 1):
            if n > 1:
                segments += ((f"mt:{seed}:s{s}:a{n - 1}", answer_tokens),)
                t += float(thinks[s, n - 2]) if thinks is not None else 0.0
            segments += ((f"mt:{seed}:s{s}:u{n}", user_tokens),)
            out.append(
                WorkloadRequest(
                    request_id=f"mt-s{s}-t{n}",
                    arrival_s=t,
                    prompt_tokens=sum(k for _, k in segments),
                    output_tokens=answer_tokens,
                    make_text=text_of(segments),
                    session_id=f"mt-s{s}",
                )
            )
    out.sort(key=lambda r: r.arrival_s)  # stable: ties keep session/turn order
    return out


def zipf_prefixes(
    *,
    requests: int = 1000,
    prefixes: int = 100,
    prefix_tokens: int = 2048,
    suffix_tokens: int = 256,
    zipf_s: float = 1.1,
    output_tokens: int = 128,
    rate: float = 5.0,
    seed: int = 0,
) -> list[WorkloadRequest]:
    """Requests made of one of `prefixes` Zipf-popular shared prefixes plus a unique suffix.

    Returns `requests` requests in arrival order, ids `zipf-{i}`; prefix k (0-based, k = 0 the
    most popular) is drawn with probability proportional to 1/(k+1)^zipf_s. See the module comment.
    """
    _check("requests", requests, 1)
    _check("prefixes", prefixes, 1)
    _check("prefix_tokens", prefix_tokens, 0)
    _check("suffix_tokens", suffix_tokens, 1)
    _check("zipf_s", zipf_s, 0)
    _check("output_tokens", output_tokens, 1)
    _check("rate", rate, 0, strict=True)
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, prefixes + 1, dtype=np.float64) ** zipf_s
    picks = rng.choice(prefixes, size=requests, p=weights / weights.sum())
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=requests))
    arrivals -= arrivals[0]
    out = []
    for i in range(requests):
        k = int(picks[i])
        segments: tuple[tuple[str, int], ...] = ((f"zipf:{seed}:p{k}", prefix_tokens),) if prefix_tokens else ()
        segments += ((f"zipf:{seed}:q{i}", suffix_tokens),)
        out.append(
            WorkloadRequest(
                request_id=f"zipf-{i}",
                arrival_s=float(arrivals[i]),
                prompt_tokens=prefix_tokens + suffix_tokens,
                output_tokens=output_tokens,
                make_text=text_of(segments),
            )
        )
    return out


def _zipf_pick(rng: np.random.Generator, n: int, s: float) -> int:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return int(rng.choice(n, p=w / w.sum()))


def sessions(
    *,
    requests: int = 1000,
    rate: float = 2.0,
    prompt_tokens: int = 1024,
    prompt_sigma: float = 0.8,
    shared_depth: int = 1,
    shared_tokens: int = 1024,
    fanout: int = 8,
    zipf_s: float = 1.0,
    reuse_share: float = 0.7,
    turns: float = 4.0,
    think_time_s: float = 20.0,
    append_tokens: int = 256,
    output_tokens: int = 256,
    agent_share: float = 0.0,
    agent_turns: float = 12.0,
    agent_think_s: float = 1.0,
    agent_append_tokens: int = 128,
    agent_output_tokens: int = 64,
    max_prompt_tokens: int = 0,
    seed: int = 0,
) -> list[WorkloadRequest]:
    """Single requests, chats and tool-agent loops under Zipf-picked shared prefix chains (see
    the module comment). Request ids `ss-{session}-t{turn}`, `session_id` `ss-{session}`."""
    for name, value, low in (("requests", requests, 1), ("prompt_tokens", prompt_tokens, 1), ("prompt_sigma", prompt_sigma, 0),
                             ("shared_depth", shared_depth, 0), ("shared_tokens", shared_tokens, 1), ("fanout", fanout, 1),
                             ("zipf_s", zipf_s, 0), ("reuse_share", reuse_share, 0), ("turns", turns, 1),
                             ("think_time_s", think_time_s, 0), ("append_tokens", append_tokens, 1),
                             ("output_tokens", output_tokens, 1), ("agent_share", agent_share, 0), ("agent_turns", agent_turns, 1),
                             ("agent_think_s", agent_think_s, 0), ("agent_append_tokens", agent_append_tokens, 1),
                             ("agent_output_tokens", agent_output_tokens, 1), ("max_prompt_tokens", max_prompt_tokens, 0)):  # fmt: skip
        _check(name, value, low)
    _check("rate", rate, 0, strict=True)
    if reuse_share + agent_share > 1:
        raise ValueError(f"reuse_share + agent_share must be <= 1, got {reuse_share!r} + {agent_share!r}")
    rng = np.random.default_rng(seed)
    single = 1.0 - reuse_share - agent_share
    per_session = single + reuse_share * turns + agent_share * agent_turns
    session_rate = rate / per_session
    out: list[WorkloadRequest] = []
    t = 0.0
    s = 0
    cutoff = math.inf  # the `requests`-th earliest arrival so far: later sessions cannot add an earlier one
    while t <= cutoff:
        kind = rng.choice(3, p=[single, reuse_share, agent_share])
        segments: tuple[tuple[str, int], ...] = ()
        path = ""
        for _level in range(shared_depth):
            path += f"/{_zipf_pick(rng, fanout, zipf_s)}"
            segments += ((f"ss:{seed}:shared{path}", shared_tokens),)
        first = max(1, int(round(rng.lognormal(math.log(prompt_tokens) - prompt_sigma**2 / 2, prompt_sigma))))
        segments += ((f"ss:{seed}:s{s}:m0", first),)
        if kind == 0:
            n_turns, gap, add, out_tokens = 1, 0.0, 0, output_tokens
        elif kind == 1:
            n_turns, gap, add, out_tokens = int(rng.geometric(1.0 / turns)), think_time_s, append_tokens, output_tokens
        else:
            n_turns, gap, add, out_tokens = int(rng.geometric(1.0 / agent_turns)), agent_think_s, agent_append_tokens, agent_output_tokens
        at = t
        for n in range(1, n_turns + 1):
            if n > 1:
                segments += ((f"ss:{seed}:s{s}:m{n - 1}", add),)
                at += float(rng.exponential(gap)) if gap > 0 else 0.0
            tokens = sum(k for _, k in segments)
            if max_prompt_tokens:
                tokens = min(tokens, max_prompt_tokens)
            out.append(
                WorkloadRequest(
                    request_id=f"ss-{s}-t{n}",
                    arrival_s=at,
                    prompt_tokens=tokens,
                    output_tokens=out_tokens,
                    make_text=partial(_cut_text, segments, tokens),
                    session_id=f"ss-{s}",
                )
            )
        s += 1
        t += float(rng.exponential(1.0 / session_rate))
        if len(out) >= requests:
            cutoff = float(np.partition(np.fromiter((r.arrival_s for r in out), float), requests - 1)[requests - 1])
    out.sort(key=lambda r: r.arrival_s)
    return out[:requests]


def _cut_text(segments: tuple[tuple[str, int], ...], tokens: int) -> str:
    """The segments' text cut to `tokens` tokens (the `make_text` of `sessions`)."""
    return _concat(segments)[: tokens * BYTES_PER_TOKEN]


GENERATORS: dict[str, Callable[..., list[WorkloadRequest]]] = {"multi-turn": multi_turn, "sessions": sessions, "zipf": zipf_prefixes}
"""Synthetic workloads by the name used in `synthetic:NAME` trace specs."""

__all__ = ["GENERATORS", "multi_turn", "sessions", "text_of", "token_text", "zipf_prefixes"]
