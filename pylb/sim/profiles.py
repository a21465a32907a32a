"""Hardware profiles for the engine model: KV-cache geometry, batching limits and step-time costs.

Design
------
One simulated vLLM replica (`pylb.sim.engine.Engine`) is described by a `Profile`:

    KV cache      num_blocks blocks of block_size tokens (automatic prefix caching over them)
    batching      at most max_num_seqs running requests and max_num_batched_tokens per step
    step time     t = c0 + c_prefill * prefill_tokens + c_decode * decode_seqs + c_attn * context_tokens
                        + c_prefill_attn * prefill_pairs

`c0` is the fixed cost of one forward pass (reading the weights once, launch overhead),
`c_prefill` the cost of one prompt token computed in the step, `c_decode` the extra cost of one
sequence decoding one token, `c_attn` the cost of one token of KV context attended in the step
(memory traffic of reading the KV cache). `c_prefill_attn` is the cost of one (query, key) pair of
causal attention among the prompt tokens a step computes: a chunk of n tokens after h tokens
already in the cache has n*h + n*(n+1)/2 of them, so a cold prompt of N tokens costs N^2/2 of them
and a cached prefix saves its share. It is optional (0 by default) and matters where attention
compute is not hidden behind the weights: measured on vLLM's CPU backend, a 2,000-token prompt
takes 2.5x as long per token as a 100-token one (`pylb calibrate` fits it). All costs are in
seconds. A profile whose costs are all zero is a pure cache model (infinite compute): every
step takes no time.

Profiles come by name from `PROFILES`, or from a YAML file with exactly the fields
`block_size, num_blocks, max_num_seqs, max_num_batched_tokens, c0, c_prefill, c_decode, c_attn`
(and optionally `c_prefill_attn`, `request_overhead`, `loaded_request_overhead`, `running_request_overhead`,
`name`, `description`); `load_profile(name_or_path)` accepts either and raises
`ProfileError` naming the field, the value and the reason for anything else. Measured profiles
ship as such files in `profile_data/` (written by `pylb calibrate`, their header comment says
how) and join `PROFILES` under their file name.

The constants of the built-in profiles are approximations derived from well-known public
figures (model configs, accelerator datasheets, vLLM defaults, the DualMap paper); each one
says where it comes from. They are meant to put TTFT and capacity in the right range, not to
predict a particular deployment to the millisecond: measure a real replica and write a YAML
profile when that matters.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any


class ProfileError(ValueError):
    """A profile name, file or field is invalid; the message names the field and the value."""


@dataclass(frozen=True)
class Profile:
    """Geometry, limits and step-time constants of one simulated vLLM replica.

    Attributes:
        name: identifier (the registry key, or the YAML file name).
        block_size: tokens per KV block (vLLM `--block-size`).
        num_blocks: KV blocks on the device (vLLM `num_gpu_blocks`).
        max_num_seqs: most requests running at once (vLLM `--max-num-seqs`).
        max_num_batched_tokens: most tokens computed in one step (vLLM `--max-num-batched-tokens`).
        c0: seconds per step, fixed.
        c_prefill: seconds per prompt token computed in the step.
        c_decode: seconds per sequence decoding one token in the step.
        c_attn: seconds per token of KV context attended in the step.
        description: where the numbers come from.
        c_prefill_attn: seconds per causal attention pair among the prompt tokens computed in the step.
        request_overhead: seconds between a request's dispatch and its arrival in the engine's
            queue (HTTP, tokenization and scheduling in vLLM's API server; `pylb calibrate`
            measures it as TTFT minus the prefill step); 0 puts it there at once. The simulator
            delays each dispatched request by it, so a router that waits for first tokens
            before dispatching more (a small dispatch budget) pays it as idle engine time.
        loaded_request_overhead: the same delay for a request sent to a replica whose engine is
            working (requests running or waiting): on a CPU replica the API server waits for a
            core that the engine and its neighbours keep busy, so it takes far longer than on an
            idle one. The larger of this and `request_overhead` applies (0: the idle value).
            `pylb calibrate` cannot see it on an idle replica; `bench/fidelity.py --overheads`
            fits it to real runs, whose vLLM histograms show it (engine TTFT minus queue and
            prefill time).
        running_request_overhead: seconds added to a request's overhead for each request running
            on its replica's engine when it is dispatched (0: none). On a CPU replica the API
            server streams every running request's tokens on the core a new request's
            tokenization waits for, so the wait grows with the batch; the constant
            `loaded_request_overhead` prices a working engine alike whether it runs one request
            or twelve. `bench/fidelity.py --running-overheads` fits it to real runs (their
            first-token latency by running batch: `--observations` and `bench/ttft_model.py
            --by-decoding`).
    """

    name: str
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    c0: float
    c_prefill: float
    c_decode: float
    c_attn: float
    description: str = ""
    c_prefill_attn: float = 0.0
    request_overhead: float = 0.0
    loaded_request_overhead: float = 0.0
    running_request_overhead: float = 0.0

    def __post_init__(self) -> None:
        for f in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens"):
            _check_int(f, getattr(self, f))
        for f in TIME_FIELDS:
            _check_cost(f, getattr(self, f))

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the whole KV cache holds (num_blocks * block_size)."""
        return self.num_blocks * self.block_size

    @property
    def busy_request_overhead(self) -> float:
        """Seconds from dispatch to a working engine's queue: max(request_overhead, loaded_request_overhead)."""
        return max(self.request_overhead, self.loaded_request_overhead)

    @property
    def zero_cost(self) -> bool:
        """True when every step takes no time (a pure cache model)."""
        return all(getattr(self, f) == 0 for f in COST_FIELDS)

    def step_time(self, prefill_tokens: int, decode_seqs: int, context_tokens: int, prefill_pairs: int = 0) -> float:
        """Seconds of one engine step (the formula of the module comment)."""
        return (
            self.c0
            + self.c_prefill * prefill_tokens
            + self.c_decode * decode_seqs
            + self.c_attn * context_tokens
            + self.c_prefill_attn * prefill_pairs
        )

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain data (the YAML fields plus name and description)."""
        return asdict(self)

    def slowed(self, factor: float, name: str | None = None, why: str = "") -> Profile:
        """The same replica with every step (and its request overhead) `factor` times as long
        (the geometry unchanged): a replica that shares its cores with the rest of a loaded fleet runs
        slower than the idle one `pylb calibrate` measured (`bench/fidelity.py --factors` fits
        the factor against real runs). `name` defaults to NAME-xFACTOR; `why` is appended to the
        description. Raises ProfileError for a factor that is not a positive number."""
        if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor) and factor > 0):
            raise ProfileError(f"slowdown factor: expected a positive number, got {factor!r}")
        costs = {f: getattr(self, f) * factor for f in TIME_FIELDS}
        note = f"{self.name} with every step time and the request overheads x {factor:g}" + (f": {why}" if why else "")
        return replace(self, name=name or f"{self.name}-x{factor:g}", description=f"{self.description}\n{note}".strip(), **costs)


COST_FIELDS = ("c0", "c_prefill", "c_decode", "c_attn", "c_prefill_attn")
"""The step-time constants, in seconds."""

OVERHEAD_FIELDS = ("request_overhead", "loaded_request_overhead", "running_request_overhead")
"""The request overheads, in seconds (optional in a YAML profile)."""

TIME_FIELDS = (*COST_FIELDS, *OVERHEAD_FIELDS)
"""Every field in seconds: the step-time constants and the request overheads (`Profile.slowed` scales them)."""


def prefill_pairs(new_tokens: int, cached_tokens: int) -> int:
    """Causal attention pairs of a prefill chunk of `new_tokens` after `cached_tokens`: n*h + n*(n+1)/2."""
    return new_tokens * cached_tokens + new_tokens * (new_tokens + 1) // 2


def _check_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(f"profile field {field} must be a positive integer, got {value!r}")
    if value <= 0:
        raise ProfileError(f"profile field {field} must be a positive integer, got {value}")


def _check_cost(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProfileError(f"profile field {field} must be a number of seconds >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ProfileError(f"profile field {field} must be a finite number of seconds >= 0, got {value}")


# ---- built-in profiles -------------------------------------------------------------------------

# H100 SXM 80 GB serving Llama-3.1-8B-Instruct in bf16 with vLLM (V1 engine).
#   block_size 16: vLLM's default block size on CUDA.
#   num_blocks 26,624 (426k tokens): KV bytes per token = 2 (K and V) x 32 layers x 8 KV heads x
#     128 head dim x 2 bytes = 131,072 B (Llama-3.1-8B config.json). Memory for KV = 79.2 GiB
#     (H100 80 GB as CUDA reports it) x 0.9 (vLLM's default gpu_memory_utilization) - 14.96 GiB of
#     weights (8.03e9 params x 2 B) - about 4 GiB of activations, CUDA graphs and workspace
#     = 52 GiB -> 425,984 tokens = 26,624 blocks. vLLM start-up logs for this pair commonly report
#     a "GPU KV cache size" of roughly 400k-480k tokens.
#   max_num_seqs 256: vLLM's long-standing default (newer releases raise it on large GPUs; the KV
#     cache binds first on long-prompt traces: 426k tokens hold ~35 Mooncake-sized requests).
#   max_num_batched_tokens 8192: vLLM V1's default chunked-prefill budget for the OpenAI server.
#   c0 6 ms: one decode step must stream the 16.06 GB of weights from HBM at 3.35 TB/s (H100 SXM
#     datasheet) = 4.8 ms, plus ~1 ms of scheduling and launch; batch-1 decode of an 8B model on
#     H100 is commonly measured at 150-170 tokens/s (6-7 ms per token).
#   c_prefill 40 us/token: 2 x 8.03e9 = 16 GFLOP per token at ~40 % of the 989 TFLOP/s dense bf16
#     peak (long prompts pay attention FLOPs on top of the linear layers) = 25k prompt tokens/s,
#     in the range of published vLLM/SGLang prefill throughputs for 8B models on one H100.
#   c_decode 30 us/sequence: the linear-layer compute of one more token in a memory-bound decode
#     batch; gives ~18k output tokens/s at batch 256 with short contexts, in line with published
#     vLLM throughput benchmarks of 8B models on H100.
#   c_attn 50 ns/context token: reading 131,072 B of KV per context token at ~2.7 TB/s achieved
#     HBM bandwidth (80 % of 3.35 TB/s).
H100_LLAMA31_8B = Profile(
    name="h100-llama3.1-8b",
    block_size=16,
    num_blocks=26_624,
    max_num_seqs=256,
    max_num_batched_tokens=8192,
    c0=6.0e-3,
    c_prefill=4.0e-5,
    c_decode=3.0e-5,
    c_attn=5.0e-8,
    description="NVIDIA H100 SXM 80GB, Llama-3.1-8B bf16, vLLM V1 defaults (approximate; see pylb/sim/profiles.py)",
)

# Qwen2.5-7B-Instruct on one Huawei Ascend 910B (64 GB HBM), the setup of the DualMap paper
# (arXiv 2602.06502, evaluation section).
#   c_prefill 0.16 ms/token, block_size 128, max_num_batched_tokens 20480: stated in the paper
#     (block size 128 is also what vllm-ascend requires).
#   num_blocks 5,120 (655k tokens): not stated in the paper. KV bytes per token = 2 x 28 layers x
#     4 KV heads x 128 head dim x 2 bytes = 57,344 B (Qwen2.5-7B config.json). Memory for KV =
#     64 GB x 0.9 (gpu_memory_utilization) - 15.2 GB of weights (7.62e9 params x 2 B) - about 4 GB
#     of activations and workspace = 38.4 GB -> 670k tokens; rounded down to 40 x 128 blocks.
#   max_num_seqs 256: not stated in the paper; vLLM's default. The KV cache binds first on the
#     Mooncake trace (655k tokens hold ~54 requests of the mean 12k-token prompt).
#   c0 15 ms: streaming 15.2 GB of weights at the 910B's ~1.6 TB/s HBM bandwidth = 9.5 ms, plus
#     the higher per-step framework overhead of vllm-ascend (~5 ms).
#   c_decode 60 us/sequence: 15 GFLOP per token at ~250 TFLOP/s effective fp16 (910B peak is
#     ~320-376 TFLOP/s), discounted because decode batches are memory-bound at small sizes.
#   c_attn 50 ns/context token: 57,344 B of KV per context token at ~1.15 TB/s achieved
#     bandwidth (70 % of 1.6 TB/s).
DUALMAP_910B = Profile(
    name="dualmap-910b",
    block_size=128,
    num_blocks=5_120,
    max_num_seqs=256,
    max_num_batched_tokens=20_480,
    c0=1.5e-2,
    c_prefill=1.6e-4,
    c_decode=6.0e-5,
    c_attn=5.0e-8,
    description="Huawei Ascend 910B 64GB, Qwen2.5-7B fp16, as in the DualMap paper (0.16 ms/prefill token; others approximate)",
)

PROFILE_DATA_DIR = Path(__file__).with_name("profile_data")
"""Measured profiles shipped with pylb (YAML files written by `pylb calibrate`)."""

PROFILES: dict[str, Profile] = {p.name: p for p in (H100_LLAMA31_8B, DUALMAP_910B)}
"""Built-in profiles by name: the ones above, then one per file in `PROFILE_DATA_DIR` (filled below)."""

DEFAULT_PROFILE = H100_LLAMA31_8B.name
"""The profile `pylb simulate` uses when none is given."""

YAML_FIELDS: tuple[str, ...] = (
    "block_size",
    "num_blocks",
    "max_num_seqs",
    "max_num_batched_tokens",
    "c0",
    "c_prefill",
    "c_decode",
    "c_attn",
)
"""Fields a YAML profile must have (times in seconds)."""

_OPTIONAL_TIMES = ("c_prefill_attn", *OVERHEAD_FIELDS)
"""Times a YAML profile may leave out (0 then)."""
_OPTIONAL_YAML_FIELDS = ("name", "description", *_OPTIONAL_TIMES)


def profile_from_dict(data: Any, *, name: str = "custom", source: str = "profile") -> Profile:
    """Build a profile from a mapping with exactly the `YAML_FIELDS` (plus optional name, description).

    Raises ProfileError naming `source` and the offending field and value.
    """
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: expected a mapping of profile fields, got {type(data).__name__}")
    known = set(YAML_FIELDS) | set(_OPTIONAL_YAML_FIELDS) | {f.name for f in fields(Profile)}
    for key in data:
        if key not in known:
            raise ProfileError(
                f"{source}: unknown profile field {key!r} (value {data[key]!r}); expected {', '.join(YAML_FIELDS)}"
            )
    missing = [f for f in YAML_FIELDS if f not in data]
    if missing:
        raise ProfileError(f"{source}: missing profile field(s) {', '.join(missing)}")
    kwargs = {f: data[f] for f in YAML_FIELDS}
    for f in _OPTIONAL_TIMES:
        if f in data:
            kwargs[f] = data[f]
    label = data.get("name", name)
    desc = data.get("description", "")
    if not isinstance(label, str) or not label:
        raise ProfileError(f"{source}: profile field name must be a non-empty string, got {label!r}")
    if not isinstance(desc, str):
        raise ProfileError(f"{source}: profile field description must be a string, got {desc!r}")
    try:
        return Profile(name=label, description=desc, **kwargs)
    except ProfileError as exc:
        raise ProfileError(f"{source}: {exc}") from None


def load_profile_file(path: str | os.PathLike[str]) -> Profile:
    """Read a YAML profile file (see module docstring); raises ProfileError on any problem."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"{p}: cannot read profile file: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{p}: not valid YAML: {exc}") from None
    return profile_from_dict(data, name=p.stem, source=str(p))


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """A built-in profile by name, or a profile read from a YAML file path.

    Raises ProfileError when the name is unknown and no such file exists, or the file is invalid.
    """
    key = os.fspath(name_or_path)
    if key in PROFILES:
        return PROFILES[key]
    if os.path.exists(key) or key.endswith((".yaml", ".yml")):
        return load_profile_file(key)
    raise ProfileError(f"unknown profile {key!r}: expected one of {', '.join(PROFILES)} or a YAML file path")


def _shipped_profiles() -> dict[str, Profile]:
    """The profiles of `PROFILE_DATA_DIR`, by file name (their `name` field must agree)."""
    out: dict[str, Profile] = {}
    for path in sorted(PROFILE_DATA_DIR.glob("*.yaml")):
        profile = load_profile_file(path)
        if profile.name != path.stem:
            raise ProfileError(f"{path}: profile field name {profile.name!r} differs from the file name {path.stem!r}")
        out[path.stem] = profile
    return out


PROFILES.update(_shipped_profiles())
