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

The defaults live only in the functions' signatures; the CLI's `synthetic:NAME:key=value,...`
specs (`pylb.workload.loaders`) read them from there.
"""

from __future__ import annotations

import hashlib
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


GENERATORS: dict[str, Callable[..., list[WorkloadRequest]]] = {"multi-turn": multi_turn, "zipf": zipf_prefixes}
"""Synthetic workloads by the name used in `synthetic:NAME` trace specs."""

__all__ = ["GENERATORS", "multi_turn", "text_of", "token_text", "zipf_prefixes"]
