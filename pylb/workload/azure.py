"""Loader for the Azure LLM inference trace CSV (Splitwise, ISCA 2024; AzurePublicDataset).

Design
------
Format: a header `TIMESTAMP,ContextTokens,GeneratedTokens` (columns found by name, in any order;
extra columns ignored), then one row per request: an absolute wall-clock timestamp
`YYYY-MM-DD HH:MM:SS[.fffffff]` (100 ns digits; a `T` separator is accepted too), the prompt
length and the output length in tokens. The trace has no prompts and no prefix information, so
every request gets its own text: `ContextTokens` tokens of deterministic text keyed by the row
number (`azure:{row}`, see `pylb.workload.synthetic.token_text`), sharing no block with any other
request. Use this trace for arrival burstiness and length mixes, not for cache affinity.

Arrival times are exact (integer 100 ns ticks, no float rounding of absolute times) and relative
to the earliest row; rows are sorted by time (stable), which leaves the published file in its
order. Request ids are `azure-{row}`, row 0 being the first data row. `limit` keeps the first
`limit` requests in arrival order.

Errors: a missing column, a row with too few fields, a malformed timestamp or a token count that
is not a non-negative integer raises ValueError naming the file, the line number and the field.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import re

from .synthetic import text_of
from .types import WorkloadRequest

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")

_TS = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?")
_TICKS_PER_S = 10_000_000  # 100 ns


def _ticks(text: str) -> int:
    """Absolute time in 100 ns ticks (naive wall clock, no time zone); ValueError if malformed."""
    m = _TS.fullmatch(text.strip())
    if not m:
        raise ValueError("expected YYYY-MM-DD HH:MM:SS[.fffffff]")
    year, month, day, hour, minute, second, frac = m.groups()
    days = _dt.date(int(year), int(month), int(day)).toordinal()  # ValueError on a bad date
    if int(hour) > 23 or int(minute) > 59 or int(second) > 60:
        raise ValueError("time of day out of range")
    seconds = ((days * 24 + int(hour)) * 60 + int(minute)) * 60 + int(second)
    frac = (frac or "")[:7].ljust(7, "0")  # digits beyond 100 ns are dropped
    return seconds * _TICKS_PER_S + int(frac)


def _count(text: str) -> int:
    value = text.strip()
    if not value.isdigit():
        raise ValueError("expected a non-negative integer")
    return int(value)


def load_azure(path: str | os.PathLike[str], limit: int | None = None) -> list[WorkloadRequest]:
    """Load an Azure LLM inference trace CSV as a workload in arrival order (see the module comment).

    Raises FileNotFoundError when the file is missing and ValueError (with file, line and field)
    when it is malformed.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    rows: list[tuple[int, int, int, int]] = []  # (ticks, row, context, generated)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header {','.join(COLUMNS)}")
        names = [h.strip() for h in header]
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{path}:1: header lacks column(s) {', '.join(missing)} (got {','.join(names)})")
        idx = [names.index(c) for c in COLUMNS]
        need = max(idx) + 1
        for fields in reader:
            if not fields or all(not x.strip() for x in fields):
                continue
            line = reader.line_num
            if len(fields) < need:
                raise ValueError(f"{path}:{line}: expected {len(names)} fields, got {len(fields)}: {fields!r}")
            parsed = []
            for column, i, parse in zip(COLUMNS, idx, (_ticks, _count, _count)):
                try:
                    parsed.append(parse(fields[i]))
                except ValueError as exc:
                    raise ValueError(f"{path}:{line}: field {column}: {exc}, got {fields[i]!r}") from None
            rows.append((parsed[0], len(rows), parsed[1], parsed[2]))
    rows.sort(key=lambda r: r[0])
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        return []
    first = rows[0][0]
    return [
        WorkloadRequest(
            request_id=f"azure-{row}",
            arrival_s=(ticks - first) / _TICKS_PER_S,
            prompt_tokens=context,
            output_tokens=generated,
            make_text=text_of(((f"azure:{row}", context),)),
        )
        for ticks, row, context, generated in rows
    ]


__all__ = ["COLUMNS", "load_azure"]
