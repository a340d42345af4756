"""Where Triton keeps the kernels it compiles, so that a restarted worker loads them instead.

Triton writes every kernel variant it compiles under $TRITON_CACHE_DIR, by default
$TRITON_HOME/.triton/cache with TRITON_HOME defaulting to the home folder, and any later
process of the same Triton version, GPU architecture and kernel source loads it from there
(milliseconds instead of a compile). pdserve keeps Triton's default rather than one of its
own: on a host that folder already outlives the process, other Triton programs and operators
who set TRITON_CACHE_DIR find it where Triton documents it, and the one place it does not
survive, a container's own file system, is the deployment's to give a volume: the image sets
TRITON_CACHE_DIR=/var/cache/pdserve/triton, and deploy/ mounts a volume there
(docs/deployment.md, "Warm starts").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def kernel_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The folder Triton compiles into under `environ`, resolved as Triton resolves it."""
    if environ.get("TRITON_CACHE_DIR"):
        return Path(environ["TRITON_CACHE_DIR"])
    home = environ.get("TRITON_HOME") or os.path.expanduser("~/")
    return Path(home) / ".triton" / "cache"


def require_writable_kernel_cache(environ: Mapping[str, str] = os.environ) -> Path:
    """The kernel cache folder, created if missing; ValueError saying what to do when it
    cannot be written (Triton would fail the first step that compiles, mid-request)."""
    folder = kernel_cache_dir(environ)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".pdserve-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"the Triton kernel cache folder {folder} cannot be written ({exc.strerror or exc}); "
            "point TRITON_CACHE_DIR at a folder this user may write, on a volume that outlives "
            "the container if kernels should survive a restart"
        ) from None
    return folder
