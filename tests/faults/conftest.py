"""The `netns` marker: tests that build network namespaces (root and `ip netns` needed).
They are deselected unless the -m expression names the marker (`pytest tests/faults -m netns`)."""

from __future__ import annotations


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "netns: builds network namespaces with ip netns (root); run with -m netns"
    )


def pytest_collection_modifyitems(config, items):
    if "netns" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("netns")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("netns")]
