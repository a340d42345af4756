"""Router, prefill and decode as three hosts: each in its own network namespace, joined by
veth pairs with addresses in 10.200.N.0/24 (one /30 per link, N from this process's pid),
and the test client in the root namespace on a fourth link to the router.

    root --(h)-- router --(rp)-- prefill
                    \\            |
                    (rd)        (pd)
                      \\          |
                        decode --+

Mid-stream the decode worker's link to the router goes down: no packet says so, but the
router's connection heartbeats do, so the stream ends with an error event and
`data: [DONE]` well within the default --worker-reply-timeout, a request sent during the
cut fails in bounded time too, and once the link is up again the router admits the
worker again and serves through prefill and decode as before.

Needs root and `ip netns`; marked `netns` (run with `pytest tests/faults -m netns`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.harness.faults import ENGINE_FLAGS, complete, events_config, stream_in_background
from tests.harness.stack import (
    RouterProcess,
    WorkerProcess,
    metric,
    router_healthy,
    start_stack,
    stop_all,
    wait_until,
)

pytestmark = pytest.mark.netns

FAIL_BOUND_S = 30.0  # the router's heartbeats give a worker up after 5 s; the default
# --worker-reply-timeout (300 s) is left as it is, so it is not what bounds the failure
PROMPT = "Write a long and careful report about lighthouses, with examples and a summary. " * 3


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")


class Net:
    """Three namespaces and four /30 links; `address[(ns, link)]` is each end's address."""

    def __init__(self) -> None:
        tag = os.getpid() % 10000
        self.octet = 20 + os.getpid() % 200
        self.ns = {role: f"pdf{tag}{role[0]}" for role in ("router", "prefill", "decode")}
        self.links = {  # name: (end A namespace or None for root, end B namespace)
            "h": (None, "router"),
            "rp": ("router", "prefill"),
            "rd": ("router", "decode"),
            "pd": ("prefill", "decode"),
        }
        self.tag = tag
        self.address: dict[tuple[str | None, str], str] = {}
        self.ifname: dict[tuple[str | None, str], str] = {}

    def up(self) -> Net:
        for name in self.ns.values():
            _ip("netns", "add", name)
            _ip("link", "set", "lo", "up", netns=name)
        for index, (link, (a, b)) in enumerate(self.links.items()):
            base = 4 * index
            ends = [(a, f"pf{self.tag}{link}a", base + 1), (b, f"pf{self.tag}{link}b", base + 2)]
            _ip("link", "add", ends[0][1], "type", "veth", "peer", "name", ends[1][1])
            for role, ifname, host in ends:
                netns = self.ns[role] if role else None
                if netns:
                    _ip("link", "set", ifname, "netns", netns)
                address = f"10.200.{self.octet}.{host}"
                _ip("addr", "add", f"{address}/30", "dev", ifname, netns=netns)
                _ip("link", "set", ifname, "up", netns=netns)
                self.address[(role, link)] = address
                self.ifname[(role, link)] = ifname
        return self

    def set_link(self, role: str, link: str, state: str) -> None:
        _ip("link", "set", self.ifname[(role, link)], state, netns=self.ns[role])

    def down(self) -> None:
        for name in self.ns.values():  # deleting a namespace deletes the veths in it
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.ifname.get((None, "h"), f"pf{self.tag}ha")],
                       capture_output=True, timeout=30)  # fmt: skip


@pytest.fixture(scope="module")
def net():
    network = Net()
    try:
        yield network.up()
    except RuntimeError as exc:
        pytest.fail(f"cannot build the network namespaces for this test (root and `ip netns` needed): {exc}")
    finally:
        network.down()


@pytest.fixture(scope="module")
def stack(net, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("netns")
    p_addr, d_addr = net.address[("prefill", "rp")], net.address[("decode", "rd")]
    p_kv, d_kv = net.address[("prefill", "pd")], net.address[("decode", "pd")]
    prefill = WorkerProcess(
        "prefill",
        [*ENGINE_FLAGS, "--kv-transfer-config", json.dumps({"kv_port": 0, "kv_ip": p_kv}),
         "--kv-events-config", events_config(p_addr)],
        workdir, address=f"tcp://{p_addr}:9100", netns=net.ns["prefill"], start=False,
    )  # fmt: skip
    decode = WorkerProcess(
        "decode",
        [*ENGINE_FLAGS, "--kv-transfer-config",
         json.dumps({"kv_port": 0, "kv_ip": d_kv, "kv_load_failure_policy": "recompute"}),
         "--kv-events-config", events_config(d_addr)],
        workdir, address=f"tcp://{d_addr}:9200", netns=net.ns["decode"], start=False,
    )  # fmt: skip
    router = RouterProcess(
        ["--prefill-workers", prefill.address, "--decode-workers", decode.address,
         "--local-prefill-threshold", "0", "--worker-health-timeout", "3"],
        host=net.address[("router", "h")], port=8000, netns=net.ns["router"], start=False,
    )  # fmt: skip
    try:
        start_stack([prefill, decode], router)
        yield prefill, decode, router
    finally:
        stop_all([prefill, decode, router])


def test_cut_decode_link_fails_in_bounded_time_then_recovers(net, stack):
    prefill, decode, router = stack
    response = complete(router.url, PROMPT)
    assert response.status_code == 200, response.text
    assert metric(router.url, "pdserve_router_prefill_decisions_total", decision="remote") >= 1

    result, thread = stream_in_background(
        router.url, {"prompt": PROMPT, "max_tokens": 300, "ignore_eos": True, "temperature": 0}, 120
    )
    assert result.first_chunk.wait(120) and result.chunks, f"no first chunk: {result.failure!r}"
    net.set_link("decode", "rd", "down")
    cut_at = time.monotonic()
    try:
        during = complete(router.url, PROMPT, timeout_s=FAIL_BOUND_S)
        assert during.status_code >= 500 and during.json()["error"]["message"], during.text
        thread.join(FAIL_BOUND_S)
        assert not thread.is_alive(), "the stream hung after the decode link went down"
        assert result.failure is None, f"the stream broke instead of ending cleanly: {result.failure!r}"
        assert result.done and len(result.errors) == 1, result.events[-3:]
        assert result.finished_at - cut_at < FAIL_BOUND_S
        assert not router_healthy(router.url, decode.address)
    finally:
        net.set_link("decode", "rd", "up")

    wait_until(
        lambda: router_healthy(router.url, decode.address), 90, "the router admits the decode worker again"
    )
    remote_before = metric(router.url, "pdserve_router_prefill_decisions_total", decision="remote")
    response = complete(router.url, PROMPT + " Again.")
    assert response.status_code == 200, response.text
    assert metric(router.url, "pdserve_router_prefill_decisions_total", decision="remote") > remote_before
    for process in stack:
        process.check_running()
