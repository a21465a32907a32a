"""The request a workload yields, shared by the simulator and the replay client.

A workload (a real trace, or a synthetic generator) is an iterable of `WorkloadRequest` in
arrival order. The prompt text is produced on demand (`prompt_text()`), because whole traces
hold hundreds of megabytes of prompt text: the simulator hashes each prompt when it submits it
and drops the text, the replay client sends it and drops it.

Text and tokens: pylb's simulated replicas count one token per 4 bytes of UTF-8 prompt text
(`BYTES_PER_TOKEN`), so a prompt of T tokens is 4*T bytes of ASCII text, and two prompts that
share their first k*4*B bytes share their first k blocks of B tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# The simulated tokenizer is the router's bytes-per-token estimate, written once there.
from pylb.router.interface import BYTES_PER_TOKEN

__all__ = ["BYTES_PER_TOKEN", "WorkloadRequest", "tokens_in"]


def tokens_in(text_bytes: int) -> int:
    """Number of simulated tokens in a prompt of `text_bytes` bytes."""
    return -(-text_bytes // BYTES_PER_TOKEN)


@dataclass(slots=True)
class WorkloadRequest:
    """One request of a workload.

    Attributes:
        request_id: unique within the workload.
        arrival_s: arrival time in seconds from the start of the workload (before rate scaling).
        prompt_tokens: prompt length in simulated tokens (= len(prompt_text().encode()) / 4, rounded up).
        output_tokens: tokens to generate (sent as max_tokens with ignore_eos).
        session_id: the conversation this request belongs to, when the workload knows it.
        make_text: builds the prompt text; called by prompt_text().
    """

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    make_text: Callable[[], str] = field(repr=False)
    session_id: str | None = None

    def prompt_text(self) -> str:
        """The prompt as ASCII text (4 bytes per simulated token); built on each call."""
        return self.make_text()
