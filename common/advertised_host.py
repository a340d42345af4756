"""Which host others dial to reach something bound here: the one rule for wildcard binds.

A socket bound to a wildcard host (0.0.0.0, ::, *) cannot be dialled at that host, so
whatever a process announces (a worker's address in the registry, its KV-event
endpoints, a KV producer's side channel) names a dialable host instead: one given
explicitly, else this machine's name. A peer that reads a wildcard endpoint anyway puts
the host it already reaches the announcer at in its place (`dialable_endpoint`).
Torch-free.
"""

from __future__ import annotations

import socket

# "" is what a tcp://:PORT endpoint leaves; "[::]" is the IPv6 wildcard as ZMQ writes it
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", "*", ""})


def is_wildcard(host: str) -> bool:
    return host in WILDCARD_HOSTS


def endpoint_host(endpoint: str) -> str:
    """The host of a tcp://HOST:PORT endpoint ("" for another transport or no host)."""
    if not endpoint.startswith("tcp://"):
        return ""
    return endpoint.removeprefix("tcp://").rpartition(":")[0]


def advertised_host(bound: str, override: str | None = None) -> str:
    """The host peers dial to reach what is bound at `bound` (a bare host, or a ZMQ
    endpoint such as tcp://0.0.0.0:5557): `override` when given, else the bound host
    unless it is a wildcard (or the transport has no host), in which case this machine's name."""
    if override:
        return override
    host = endpoint_host(bound) if "://" in bound else bound
    return socket.gethostname() if is_wildcard(host) else host


def advertise_endpoint(endpoint: str | None, host: str) -> str | None:
    """A bound ZMQ endpoint as others dial it: a wildcard host becomes `host`; any other
    endpoint (a real host, ipc://, None) is returned as it is."""
    if endpoint is None or not endpoint.startswith("tcp://"):
        return endpoint
    bound_host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return f"tcp://{host}:{port}" if is_wildcard(bound_host) else endpoint


def dialable_endpoint(endpoint: str, peer_address: str) -> str:
    """An endpoint a peer announced, as this side dials it: a wildcard host becomes the host
    of `peer_address` (where this side already reaches the peer), else 127.0.0.1."""
    return advertise_endpoint(endpoint, endpoint_host(peer_address) or "127.0.0.1") or endpoint
