"""Cheap guards on the token difference between a query and its cached neighbour.

Design
------
Embeddings place opposite meanings close together ("how do I enable X" / "how do I disable X";
with all-MiniLM such pairs score ~0.93 while real paraphrases score ~0.86), so a similarity
threshold alone cannot be safe. Before a neighbour may answer, `refusal(query, neighbour)`
compares the two texts' tokens and refuses when the texts differ in what embeddings blur:

  negation     the multiset of negation words differs (not, no, never, n't, without, ...)
  antonyms     a word of one text has its antonym in the other (from `ANTONYMS`, a small table of
               common pairs: enable/disable, increase/decrease, before/after, ...)
  numbers      the multisets of numbers differ (digits, decimals, number words one..twenty,
               hundred, thousand, million, billion; "3" and "three" are the same number)
  entities     a capitalised word not at the start of a sentence (a name, place, product) of one
               text is not a word of the other (in any case), or the sets of quoted strings differ
  question     one text asks who, when or where and the other does not ask the same (a person, a
               time and a place are different answers; what / which / how / why are often
               interchangeable in paraphrases, so they are not compared)
  identifiers  the sets of code identifiers differ (snake_case, camelCase, dotted.names, calls
               `f()`, anything in backticks)

Each guard errs towards refusing: a refused hit costs one upstream request, a false hit a wrong
answer. Paraphrases that keep the same numbers, names and identifiers pass.
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"[A-Za-z0-9_]+(?:['’][A-Za-z]+)?")
_NUMBER = re.compile(r"(?<![A-Za-z_])[-+]?\d+(?:[.,]\d+)*(?:e[-+]?\d+)?%?")
_IDENT = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+\b|\b[A-Za-z0-9]*_[A-Za-z0-9_]+\b|\b[a-z]+[A-Z][A-Za-z0-9]*\b|\b[A-Za-z_][A-Za-z0-9_]*\(")
_BACKTICK = re.compile(r"`([^`]+)`")
_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”")
_SENTENCE_END = re.compile(r"[.!?:;\n]\s*$")

_WH = frozenset(("who", "whom", "whose", "when", "where"))

NEGATIONS = frozenset(
    "not no never none nothing nobody nowhere neither nor without cannot cant dont doesnt didnt isnt arent wasnt werent "
    "wont wouldnt shouldnt couldnt hasnt havent hadnt mustnt neednt except unless".split()
)

NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
} | {"thirty": "30", "forty": "40", "fifty": "50", "hundred": "100", "thousand": "1000", "million": "1e6", "billion": "1e9", "first": "1st", "second": "2nd", "third": "3rd", "half": "0.5", "double": "2x", "twice": "2x", "triple": "3x"}

_PAIRS = """enable disable increase decrease add remove before after above below min max minimum maximum
    true false yes no start stop open close first last inside outside up down left right in out on off
    import export upload download push pull encrypt decrypt encode decode compress decompress install uninstall
    allow deny accept reject include exclude insert delete create destroy connect disconnect lock unlock
    show hide buy sell win lose best worst more less most least higher lower high low faster slower fast slow
    larger smaller large small bigger smaller big little long short longer shorter heavy light hot cold warm cool
    good bad better worse positive negative love hate like dislike safe dangerous legal illegal possible impossible
    success failure pass fail public private import export read write send receive input output cheap expensive
    early late old new young old ascending descending asc desc horizontal vertical north south east west
    sync async synchronous asynchronous serialize deserialize mount unmount attach detach increment decrement
    always never all none everything nothing agree disagree advantages disadvantages pros cons benefits risks
    same different similar different strong weak rich poor easy hard simple complex empty full wide narrow
    visible invisible valid invalid enabled disabled lowercase uppercase prefix suffix client server male female
    light dark day night summer winter morning evening birth death living dead buy rent borrow lend""".split()
ANTONYMS: dict[str, frozenset[str]] = {}
for _a, _b in zip(_PAIRS[::2], _PAIRS[1::2]):
    ANTONYMS[_a] = ANTONYMS.get(_a, frozenset()) | {_b}
    ANTONYMS[_b] = ANTONYMS.get(_b, frozenset()) | {_a}


def _words(text: str) -> list[str]:
    return [w.lower().replace("’", "'") for w in _WORD.findall(text)]


def _negations(words: list[str]) -> Counter[str]:
    out: Counter[str] = Counter()
    for w in words:
        bare = w.replace("'", "")
        if bare in NEGATIONS or w.endswith("n't"):
            out["neg"] += 1
    return out


def _numbers(text: str, words: list[str]) -> Counter[str]:
    out: Counter[str] = Counter()
    for m in _NUMBER.findall(text):
        v = m.replace(",", "")
        try:
            f = float(v.rstrip("%"))
            v = (str(int(f)) if f.is_integer() else repr(f)) + ("%" if m.endswith("%") else "")
        except ValueError:
            pass
        out[v] += 1
    for w in words:
        if w in NUMBER_WORDS:
            out[NUMBER_WORDS[w]] += 1
    return out


def _entities(text: str) -> set[str]:
    """Capitalised words not at the start of a sentence (lower-cased)."""
    out = set()
    for m in re.finditer(r"\b[A-Z][A-Za-z0-9]+\b", text):
        before = text[: m.start()]
        if not before.strip() or _SENTENCE_END.search(before):
            continue
        out.add(m.group().lower())
    return out


def _quoted(text: str) -> set[str]:
    return {(a or b).lower() for a, b in _QUOTED.findall(text)}


def _identifiers(text: str) -> set[str]:
    out = {m.rstrip("(") for m in _IDENT.findall(text)}
    out |= {m.strip() for m in _BACKTICK.findall(text)}
    return out


def refusal(query: str, neighbour: str) -> str | None:
    """Why `neighbour`'s answer must not answer `query` (see the module comment), or None when
    no guard objects."""
    if query == neighbour:
        return None
    wq, wn = _words(query), _words(neighbour)
    if _negations(wq) != _negations(wn):
        return "negation"
    only_q, only_n = set(wq) - set(wn), set(wn) - set(wq)
    for w in only_q:
        if ANTONYMS.get(w, frozenset()) & only_n:
            return "antonym"
    if _numbers(query, wq) != _numbers(neighbour, wn):
        return "numbers"
    if set(wq) & _WH != set(wn) & _WH:
        return "question"
    if _identifiers(query) != _identifiers(neighbour):
        return "identifiers"
    if _entities(query) - set(wn) or _entities(neighbour) - set(wq) or _quoted(query) != _quoted(neighbour):
        return "entities"
    return None


GUARDS = ("negation", "antonym", "numbers", "question", "identifiers", "entities")
"""The reasons `refusal` may give, in the order it checks them."""
