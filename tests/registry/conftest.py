from __future__ import annotations

import pytest

from tests.registry.redis_server import RedisServer


@pytest.fixture
def redis_server():
    """A fresh redis-server for one test (a test may stop and start it again)."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
