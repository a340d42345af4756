"""`kv_transfer_params`: what a producer hands back (through the router) so that a
consumer can find and pull a request's blocks.

The keys are vLLM's (remote_engine_id, remote_host, remote_port, remote_block_ids,
remote_request_id, tp_size, remote_num_tokens, remote_blocks_expiry_time,
do_remote_prefill, do_remote_decode), plus pdserve's remote_instance_id, which tells a
restarted producer's blocks from the ones these params name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvtransfer.side_channel import MessageError, get_int, get_int_list, get_str

MAX_BLOCKS_PER_REQUEST = 1 << 24


@dataclass(frozen=True)
class RemoteBlocks:
    engine_id: str
    host: str
    port: int
    request_id: str
    block_ids: list[int]
    num_tokens: int
    tp_size: int
    expiry_time: float | None = None  # time.time() after which the producer may reuse the blocks
    instance_id: str | None = None

    @property
    def peer(self) -> tuple[str, int]:
        return (self.host, self.port)

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_host": self.host,
            "remote_port": self.port,
            "remote_block_ids": list(self.block_ids),
            "remote_request_id": self.request_id,
            "remote_num_tokens": self.num_tokens,
            "tp_size": self.tp_size,
            "remote_blocks_expiry_time": self.expiry_time,
        }
        if self.instance_id is not None:
            params["remote_instance_id"] = self.instance_id
        return params

    @classmethod
    def from_params(cls, params: Any) -> RemoteBlocks:
        """Check params that came through the router; ValueError says what is wrong."""
        if not isinstance(params, dict):
            raise ValueError(f"kv_transfer_params must be a map, got {type(params).__name__}")
        try:
            expiry = params.get("remote_blocks_expiry_time")
            if expiry is not None and (
                isinstance(expiry, bool) or not isinstance(expiry, int | float) or not math.isfinite(expiry)
            ):
                raise MessageError(f"field 'remote_blocks_expiry_time' must be a number, got {expiry!r}")
            instance_id = params.get("remote_instance_id")
            return cls(
                engine_id=get_str(params, "remote_engine_id"),
                host=get_str(params, "remote_host", 255),
                port=get_int(params, "remote_port", 1, 65535),
                request_id=get_str(params, "remote_request_id"),
                block_ids=get_int_list(params, "remote_block_ids", 0, (1 << 40), MAX_BLOCKS_PER_REQUEST),
                num_tokens=get_int(params, "remote_num_tokens", 0, 1 << 40)
                if "remote_num_tokens" in params
                else 0,
                tp_size=get_int(params, "tp_size", 1, 1 << 16) if "tp_size" in params else 1,
                expiry_time=None if expiry is None else float(expiry),
                instance_id=None if instance_id is None else get_str(params, "remote_instance_id"),
            )
        except MessageError as e:
            raise ValueError(f"bad kv_transfer_params: {e}") from None
