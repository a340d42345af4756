"""The advertised-host rule: what peers dial to reach a socket bound to a wildcard host."""

from __future__ import annotations

import socket

import pytest

from common.advertised_host import advertise_endpoint, advertised_host, dialable_endpoint, endpoint_host

HERE = socket.gethostname()


@pytest.mark.parametrize(
    ("bound", "override", "expected"),
    [
        ("0.0.0.0", None, HERE),
        ("::", None, HERE),
        ("10.0.0.2", None, "10.0.0.2"),
        ("0.0.0.0", "gpu-7", "gpu-7"),
        ("tcp://*:5557", None, HERE),
        ("tcp://[::]:5557", None, HERE),
        ("tcp://10.0.0.2:5557", None, "10.0.0.2"),
        ("ipc:///tmp/worker.sock", None, HERE),
    ],
)
def test_a_wildcard_bind_is_announced_as_this_machine_unless_overridden(bound, override, expected):
    assert advertised_host(bound, override) == expected


def test_only_wildcard_tcp_endpoints_are_rewritten():
    assert advertise_endpoint("tcp://0.0.0.0:5557", "gpu-7") == "tcp://gpu-7:5557"
    assert advertise_endpoint("tcp://10.0.0.2:5557", "gpu-7") == "tcp://10.0.0.2:5557"
    assert advertise_endpoint("ipc:///tmp/events", "gpu-7") == "ipc:///tmp/events"
    assert advertise_endpoint(None, "gpu-7") is None
    assert endpoint_host("tcp://10.0.0.2:7000") == "10.0.0.2" and endpoint_host("ipc:///x") == ""


def test_a_peers_wildcard_endpoint_is_dialled_on_the_host_the_peer_is_reached_at():
    assert dialable_endpoint("tcp://*:5557", "tcp://10.0.0.2:7000") == "tcp://10.0.0.2:5557"
    assert dialable_endpoint("tcp://*:5557", "ipc:///tmp/worker") == "tcp://127.0.0.1:5557"
    assert dialable_endpoint("tcp://10.0.0.3:5557", "tcp://10.0.0.2:7000") == "tcp://10.0.0.3:5557"
