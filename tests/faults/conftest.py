"""The `netns` marker: tests that build network namespaces (root and `ip netns` needed). CI runs
them (it runs as root); elsewhere `-m "not netns"` leaves them out."""

from __future__ import annotations


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "netns: builds network namespaces with ip netns (needs root); -m 'not netns' skips"
    )
