"""Fixtures for the KV-transfer tests: one producer process serving connectors of every
kind, and a consumer of the kind under test in the test process."""

from __future__ import annotations

import pytest
from kv_transfer_harness import ProducerProcess, make_consumer

from kvtransfer.kv_cache_spec import KVCacheSpec

CONNECTORS = ["TcpConnector", "NixlConnector"]
PRODUCER_BLOCKS = 32


@pytest.fixture(scope="session")
def kv_spec() -> KVCacheSpec:
    # 1 KiB blocks: 2 layers x K,V x 2 heads x 4 tokens x 8 dims of float32
    return KVCacheSpec("test-model", "float32", num_kv_heads=2, head_size=8, num_layers=2, block_size=4)


class Producers:
    """Producer connectors inside one other process, each created on first use."""

    def __init__(self, process: ProducerProcess, spec: KVCacheSpec) -> None:
        self.process = process
        self.spec = spec
        self._keys: dict[tuple, str] = {}
        self.addresses: dict[str, tuple[str, int]] = {}

    def get(self, connector: str, **extra) -> str:
        """The key of a producer connector of this kind and kv_connector_extra_config."""
        wanted = (connector, tuple(sorted(extra.items())))
        if wanted not in self._keys:
            key, address = self.process.create(connector, self.spec, PRODUCER_BLOCKS, extra)
            self._keys[wanted], self.addresses[key] = key, address
        return self._keys[wanted]


@pytest.fixture(scope="session")
def producers(kv_spec):
    process = ProducerProcess()
    yield Producers(process, kv_spec)
    process.close()


@pytest.fixture(params=CONNECTORS)
def connector_name(request) -> str:
    return request.param


@pytest.fixture
def consumer(connector_name, kv_spec):
    consumer = make_consumer(connector_name, kv_spec)
    yield consumer
    consumer.close()
