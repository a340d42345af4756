"""Messages between the router and the workers: msgpack maps over ZMQ, never pickle.

Every message is a map with a "type" key and a "request_id" (load reports carry the
worker id instead). `decode_message` validates an incoming frame completely and raises
ProtocolError on anything malformed, so a worker or router answers with an error
message instead of crashing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import msgpack

from common.lora.lora_request import MAX_NAME_CHARS as MAX_LORA_NAME_CHARS
from common.lora.lora_request import LoRARequest
from common.sampling_params import SamplingParams
from common.structured_output.spec import StructuredOutputSpec

MAX_FRAME_BYTES = 64 * 1024 * 1024
# the most adapter names one load report may carry (a worker holds --max-cpu-loras of them)
MAX_REPORTED_LORAS = 1024


class ProtocolError(ValueError):
    pass


class WorkerRole(str, Enum):
    """The part a worker plays; its value is the role's name on the wire, in load reports,
    registry records and metrics labels."""

    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class GenerateRequest:
    """Router → worker: run this prompt. prefill_only: compute the prompt, sample the
    first token and keep the blocks for a decode worker to pull (kv_transfer_params in
    the answer). kv_transfer_params given: pull the prompt's KV from that producer.
    lora: the adapter the request runs under, as LoRARequest.to_wire() writes it
    ({"name", "path", "id"}); a worker that does not hold it yet loads it from the path."""

    TYPE: ClassVar[str] = "generate"
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: dict[str, Any]
    priority: int = 0
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    prefill_only: bool = False
    lora: dict[str, Any] | None = None

    def sampling(self) -> SamplingParams:
        return sampling_params_from_wire(self.sampling_params)

    def lora_request(self) -> LoRARequest | None:
        return None if self.lora is None else LoRARequest.from_wire(self.lora)


@dataclass
class Abort:
    TYPE: ClassVar[str] = "abort"
    request_id: str


@dataclass
class TokenDelta:
    """Worker → router: new tokens of a request; the last one has finish_reason set.
    logprobs rows: [token_id, logprob, rank, [[top_id, top_logprob], ...]]."""

    TYPE: ClassVar[str] = "delta"
    request_id: str
    token_ids: list[int]
    logprobs: list[list[Any]] | None = None
    finish_reason: str | None = None
    stop_reason: int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # set by a prefill_only request's answer: how the decode worker finds the blocks
    kv_transfer_params: dict[str, Any] | None = None


@dataclass
class ErrorMessage:
    TYPE: ClassVar[str] = "error"
    request_id: str
    code: int
    message: str


@dataclass
class LoadLoRA:
    """Router → worker: load this adapter ({"name", "path", "id"}) now, so a refusal (a
    missing folder, a rank above --max-lora-rank, a module the model lacks) reaches the
    operator at /v1/load_lora_adapter rather than a request. Answered with a LoRAResult."""

    TYPE: ClassVar[str] = "load_lora"
    request_id: str
    lora: dict[str, Any]


@dataclass
class UnloadLoRA:
    """Router → worker: drop this adapter; requests running under it finish first.
    Answered with a LoRAResult (ok False when the worker did not hold it)."""

    TYPE: ClassVar[str] = "unload_lora"
    request_id: str
    lora_name: str


@dataclass
class LoRAResult:
    """Worker → router: how a LoadLoRA or UnloadLoRA went. code: an HTTP status, 200 when
    ok, else what the engine said (400 a bad adapter, 404 no adapter at the path)."""

    TYPE: ClassVar[str] = "lora_result"
    request_id: str
    ok: bool
    code: int = 200
    message: str = ""


@dataclass
class Hello:
    """Router → worker when it connects: the worker starts sending it LoadReports."""

    TYPE: ClassVar[str] = "hello"
    router_id: str
    request_id: str = ""


@dataclass
class LoadReport:
    """Worker → router, on hello, after each change of its load and as a heartbeat
    (common/worker/load_reports.py): how loaded the worker is, which the routing scorers
    weigh, and what a router needs to know to route to it and index its cache. The
    router keeps the last one it got from each worker as it is (router/worker_state.py).

    Every field has a default so a partial report reads as "not said"; on the wire the
    worker's identity and its load figures are required (WIRE_REQUIRED)."""

    TYPE: ClassVar[str] = "load"
    WIRE_REQUIRED: ClassVar[tuple[str, ...]] = (
        "worker_id", "role", "num_running", "num_waiting", "num_queued_prefill_tokens", "kv_cache_usage",
    )  # fmt: skip
    worker_id: str = ""
    role: WorkerRole = WorkerRole.DECODE
    engine_id: str = ""  # changes when the worker restarts
    # the load, as the worker's Prometheus gauges say it
    num_running: int = 0  # sequences in its running batch (vllm:num_requests_running)
    num_waiting: int = 0  # queued, not yet scheduled, remote-KV pulls included (vllm:num_requests_waiting)
    num_queued_prefill_tokens: int = 0  # prompt tokens accepted but not yet prefilled
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0 to 1 (vllm:kv_cache_usage_perc)
    # prompt tokens computed since the worker started (vllm:prompt_tokens_total): the router
    # derives the worker's observed prefill speed from it; 0 from a worker that does not say
    num_prompt_tokens_total: int = 0
    # what the worker is; 0 or "" where it does not say
    num_kv_blocks: int = 0  # size of its KV cache in blocks
    max_num_seqs: int = 0  # sizes the router's admission limit
    block_size: int = 0  # with prefix_caching_hash_algo: how it hashes blocks, which the router must match
    prefix_caching_hash_algo: str = ""
    # where its KV events are published (a bind address such as tcp://*:5557 is read on its host)
    kv_events_endpoint: str | None = None
    kv_replay_endpoint: str | None = None
    kv_events_topic: str = ""
    # the LoRA adapters the worker holds in host memory (up to --max-cpu-loras), by name:
    # a request under one of them starts there without loading it
    loras: list[str] = dataclasses.field(default_factory=list)
    request_id: str = ""  # load reports concern no request

    @classmethod
    def from_dict(cls, data: Any) -> LoadReport:
        """A report from a map of its fields; ProtocolError (a ValueError) saying which
        field is wrong."""
        if not isinstance(data, dict):
            raise ProtocolError(f"a load report must be a map, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProtocolError(f"load report has unknown fields {unknown}; known: {sorted(known)}")
        report = cls(**data)
        report.check()
        return report

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def check(self) -> None:
        """Raise ProtocolError unless every field has its type and range; the role becomes a
        WorkerRole and kv_cache_usage a float."""
        for name in ("worker_id", "engine_id", "prefix_caching_hash_algo", "kv_events_topic", "request_id"):
            value = getattr(self, name)
            _check(
                isinstance(value, str) and len(value) <= 1024, f"load report field {name} must be a string"
            )
        _check(
            isinstance(self.role, str) and self.role in _ROLE_VALUES,
            f"load report field role must be one of {sorted(_ROLE_VALUES)}, got {self.role!r}",
        )
        self.role = WorkerRole(self.role)
        for name in ("num_running", "num_waiting", "num_queued_prefill_tokens", "num_kv_blocks", "max_num_seqs",
                     "block_size", "num_prompt_tokens_total"):  # fmt: skip
            value = getattr(self, name)
            _check(
                _is_int(value) and value >= 0,
                f"load report field {name} must be a non-negative int, got {value!r}",
            )
        usage = self.kv_cache_usage
        _check(
            _is_number(usage) and 0.0 <= usage <= 1.0,
            f"load report field kv_cache_usage must be a number from 0 to 1, got {usage!r}",
        )
        self.kv_cache_usage = float(usage)
        for name in ("kv_events_endpoint", "kv_replay_endpoint"):
            value = getattr(self, name)
            _check(
                value is None or isinstance(value, str), f"load report field {name} must be a string or nil"
            )
        loras = self.loras
        _check(
            isinstance(loras, list)
            and len(loras) <= MAX_REPORTED_LORAS
            and all(isinstance(n, str) and 0 < len(n) <= MAX_LORA_NAME_CHARS for n in loras),
            f"load report field loras must be a list of at most {MAX_REPORTED_LORAS} adapter names",
        )


_ROLE_VALUES = frozenset(role.value for role in WorkerRole)


MESSAGE_TYPES = {
    cls.TYPE: cls
    for cls in (
        GenerateRequest, Abort, TokenDelta, ErrorMessage, Hello, LoadReport, LoadLoRA, UnloadLoRA, LoRAResult,
    )
}  # fmt: skip
Message = (
    GenerateRequest
    | Abort
    | TokenDelta
    | ErrorMessage
    | Hello
    | LoadReport
    | LoadLoRA
    | UnloadLoRA
    | LoRAResult
)

_SAMPLING_FIELDS = {f.name: f for f in dataclasses.fields(SamplingParams)}


def encode_message(msg: Message) -> bytes:
    body = dataclasses.asdict(msg)
    body["type"] = msg.TYPE
    return msgpack.packb(body, use_bin_type=True)


def decode_message(frame: bytes) -> Message:
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"message of {len(frame)} bytes is larger than {MAX_FRAME_BYTES}")
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=False, max_bin_len=MAX_FRAME_BYTES)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"not a msgpack message: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise ProtocolError("a message must be a msgpack map")
    cls = MESSAGE_TYPES.get(body.pop("type", None))  # type: ignore[arg-type]
    if cls is None:
        raise ProtocolError(f"unknown message type; expected one of {sorted(MESSAGE_TYPES)}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(body) - set(known)
    if unknown:
        raise ProtocolError(f"{cls.TYPE}: unknown fields {sorted(unknown)}")
    missing = [name for name in getattr(cls, "WIRE_REQUIRED", ()) if name not in body]
    if missing:
        raise ProtocolError(f"{cls.TYPE}: missing fields {missing}")
    try:
        msg = cls(**body)
    except TypeError as exc:
        raise ProtocolError(f"{cls.TYPE}: {exc}") from None
    _check_types(msg)
    return msg


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ProtocolError(what)


def _check_types(msg: Message) -> None:
    _check(isinstance(msg.request_id, str) and len(msg.request_id) <= 1024, "request_id must be a string")
    if isinstance(msg, GenerateRequest):
        ids = msg.prompt_token_ids
        _check(isinstance(ids, list) and len(ids) > 0, "generate: prompt_token_ids must be a non-empty list")
        _check(
            all(_is_int(t) and t >= 0 for t in ids), "generate: prompt_token_ids must be non-negative ints"
        )
        _check(isinstance(msg.sampling_params, dict), "generate: sampling_params must be a map")
        sampling_params_from_wire(msg.sampling_params)
        _check(_is_int(msg.priority), "generate: priority must be an int")
        _check(
            msg.cache_salt is None or isinstance(msg.cache_salt, str), "generate: cache_salt must be a string"
        )
        _check(
            msg.kv_transfer_params is None or isinstance(msg.kv_transfer_params, dict),
            "generate: kv_transfer_params must be a map",
        )
        _check(isinstance(msg.prefill_only, bool), "generate: prefill_only must be a bool")
        if msg.lora is not None:
            _lora_from_wire("generate", msg.lora)
    elif isinstance(msg, LoadLoRA):
        _lora_from_wire("load_lora", msg.lora)
    elif isinstance(msg, UnloadLoRA):
        name = msg.lora_name
        _check(
            isinstance(name, str) and 0 < len(name) <= MAX_LORA_NAME_CHARS,
            f"unload_lora: lora_name must be a string of 1 to {MAX_LORA_NAME_CHARS} characters",
        )
    elif isinstance(msg, LoRAResult):
        _check(isinstance(msg.ok, bool), "lora_result: ok must be a bool")
        _check(
            _is_int(msg.code) and isinstance(msg.message, str),
            "lora_result: code must be an int, message a string",
        )
    elif isinstance(msg, TokenDelta):
        _check(isinstance(msg.token_ids, list) and all(_is_int(t) for t in msg.token_ids), "delta: token_ids")
        _check(msg.logprobs is None or isinstance(msg.logprobs, list), "delta: logprobs must be a list")
        _check(msg.finish_reason in (None, "stop", "length", "abort"), "delta: finish_reason")
        _check(msg.stop_reason is None or _is_int(msg.stop_reason), "delta: stop_reason must be an int")
        _check(_is_int(msg.num_prompt_tokens) and _is_int(msg.num_cached_tokens), "delta: token counts")
        _check(
            msg.kv_transfer_params is None or isinstance(msg.kv_transfer_params, dict),
            "delta: kv_transfer_params must be a map",
        )
    elif isinstance(msg, ErrorMessage):
        _check(
            _is_int(msg.code) and isinstance(msg.message, str), "error: code must be an int, message a string"
        )
    elif isinstance(msg, Hello):
        _check(
            isinstance(msg.router_id, str) and len(msg.router_id) <= 256, "hello: router_id must be a string"
        )
    elif isinstance(msg, LoadReport):
        msg.check()


def _lora_from_wire(where: str, value: Any) -> LoRARequest:
    try:
        return LoRARequest.from_wire(value)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"{where}: {exc}") from None


def sampling_params_to_wire(params: SamplingParams) -> dict[str, Any]:
    wire = dataclasses.asdict(params)
    if params.logit_bias is not None:
        wire["logit_bias"] = {int(k): float(v) for k, v in params.logit_bias.items()}
    return wire


def sampling_params_from_wire(wire: dict[str, Any]) -> SamplingParams:
    unknown = set(wire) - set(_SAMPLING_FIELDS)
    if unknown:
        raise ProtocolError(f"sampling_params: unknown fields {sorted(unknown)}")
    structured = None
    for name, value in wire.items():
        if value is None and name in (
            "seed",
            "logit_bias",
            "logprobs",
            "structured_outputs",
            "structured_outputs_after",
        ):
            continue
        if name in (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            # NaN or infinity would pass range checks and fail the sampler's whole step
            _check(
                _is_number(value) and math.isfinite(value), f"sampling_params.{name} must be a finite number"
            )
        elif name == "structured_outputs":
            structured = _structured_outputs_from_wire(value)
        elif name == "ignore_eos":
            _check(isinstance(value, bool), "sampling_params.ignore_eos must be a bool")
        elif name == "stop_token_ids":
            _check(
                isinstance(value, list) and all(_is_int(t) for t in value), "sampling_params.stop_token_ids"
            )
        elif name == "logit_bias":
            _check(
                isinstance(value, dict) and all(_is_int(k) and _is_number(v) for k, v in value.items()),
                "sampling_params.logit_bias must map ints to numbers",
            )
        else:
            _check(_is_int(value), f"sampling_params.{name} must be an int")
    return SamplingParams(**{**wire, "structured_outputs": structured})


def _structured_outputs_from_wire(value: Any) -> StructuredOutputSpec:
    fields = ("kind", "text", "disable_any_whitespace", "disable_additional_properties")
    _check(
        isinstance(value, dict) and set(value) <= set(fields) and "kind" in value,
        f"sampling_params.structured_outputs must be a map of {', '.join(fields)}",
    )
    _check(isinstance(value.get("text", ""), str), "sampling_params.structured_outputs.text must be a string")
    for flag in fields[2:]:
        _check(
            isinstance(value.get(flag, False), bool),
            f"sampling_params.structured_outputs.{flag} must be a bool",
        )
    try:
        return StructuredOutputSpec(**value)
    except ValueError as exc:
        raise ProtocolError(f"sampling_params.structured_outputs: {exc}") from None
