"""The Triton kernel cache folder: found where Triton looks for it, created when missing, and
a folder that cannot be written refused at start with what to do, not mid-request."""

from __future__ import annotations

import os

import pytest

from common.engine.kernel_cache import kernel_cache_dir, require_writable_kernel_cache


def test_the_folder_is_the_one_triton_uses(tmp_path):
    assert kernel_cache_dir({"TRITON_CACHE_DIR": str(tmp_path / "k")}) == tmp_path / "k"
    both = {"TRITON_CACHE_DIR": str(tmp_path / "k"), "TRITON_HOME": str(tmp_path / "h")}
    assert kernel_cache_dir(both) == tmp_path / "k"
    assert kernel_cache_dir({"TRITON_HOME": str(tmp_path / "h")}) == tmp_path / "h" / ".triton" / "cache"
    assert kernel_cache_dir({}) == kernel_cache_dir({"TRITON_CACHE_DIR": ""})
    assert str(kernel_cache_dir({})) == os.path.join(os.path.expanduser("~"), ".triton", "cache")


def test_triton_itself_resolves_the_same_folder(tmp_path, monkeypatch):
    import triton

    knobs = triton.knobs
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "k"))
    assert kernel_cache_dir() == tmp_path / "k" == type(tmp_path)(knobs.cache.dir)
    monkeypatch.delenv("TRITON_CACHE_DIR")
    monkeypatch.setenv("TRITON_HOME", str(tmp_path / "h"))
    assert kernel_cache_dir() == type(tmp_path)(knobs.cache.dir)


def test_a_missing_folder_is_created(tmp_path):
    folder = require_writable_kernel_cache({"TRITON_CACHE_DIR": str(tmp_path / "a" / "b")})
    assert folder == tmp_path / "a" / "b" and folder.is_dir()
    assert list(folder.iterdir()) == []  # the write check leaves nothing behind


def test_a_folder_that_cannot_be_written_is_refused_saying_what_to_do(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError) as exc:
        require_writable_kernel_cache({"TRITON_CACHE_DIR": str(blocker / "cache")})
    message = str(exc.value)
    assert str(blocker / "cache") in message and "TRITON_CACHE_DIR" in message and "volume" in message
