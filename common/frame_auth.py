"""The cluster secret: HMAC-SHA256 tags on the messages between routers and workers and
on the KV side channel, so that only processes holding the secret can talk to a worker.

A sealed frame is the payload with a 60-byte tag in front:

    b"PDA1" | timestamp ms (u64) | session (8 random bytes) | counter (u64) | HMAC (32) | payload

The HMAC covers everything before it and the payload, under a key derived from the
secret per channel ("worker": router <-> worker, "kv-side-channel": KV transfers), so a
frame of one channel is refused on the other. A receiver drops a frame whose tag is
missing or wrong (`FrameRejected`), and refuses replays: each sending thread has its own
session and counts its frames; per session the receiver accepts a counter only once,
within a sliding window of the highest one seen (frames from one session may interleave
a little across sockets). Every frame must carry a timestamp within MAX_CLOCK_SKEW_S of
the receiver's clock, so a session idle for SESSION_IDLE_S can be forgotten: its old
frames, replayed to it or to a fresh or restarted receiver, are refused as too old.
Frames carrying the receiver's own session (a reflected frame) are refused.

This is authentication, not encryption: who can read the network still reads prompts,
tokens and KV blocks (docs/security.md). Torch-free.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
import threading
import time
from dataclasses import dataclass

MAGIC = b"PDA1"
_HEAD = struct.Struct(">4sQ8sQ")  # magic, timestamp ms, session, counter
TAG_BYTES = _HEAD.size + 32
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 4096
MAX_CLOCK_SKEW_S = 60.0
SESSION_IDLE_S = 300.0  # more than twice the skew: a forgotten session's frames are all too old
REPLAY_WINDOW = 1024  # counters below the highest seen that may still arrive late, once
SECRET_ENV = "PDSERVE_CLUSTER_SECRET"
SECRET_FILE_ENV = "PDSERVE_CLUSTER_SECRET_FILE"

WORKER_CHANNEL = "worker"
SIDE_CHANNEL = "kv-side-channel"


class FrameRejected(ValueError):
    """A frame without a valid tag, or a replay; its text says which."""


@dataclass
class _Session:
    highest: int
    seen: int  # bit i set: counter highest - i arrived
    last_seen: float


class _Sender(threading.local):
    """Each sending thread is its own session, so its counter follows its send order."""

    def __init__(self) -> None:
        self.session = secrets.token_bytes(8)
        self.counter = 0


class FrameAuth:
    """Seals outgoing and opens incoming frames of one channel; safe to share across threads."""

    def __init__(self, secret: bytes, channel: str) -> None:
        check_secret(secret)
        self.channel = channel
        self._key = hmac.new(secret, b"pdserve frame key v1|" + channel.encode(), hashlib.sha256).digest()
        self._sender = _Sender()
        self._own_sessions: set[bytes] = set()
        self._sessions: dict[bytes, _Session] = {}
        self._lock = threading.Lock()
        self._pruned_at = time.monotonic()
        self.num_rejected = 0

    def seal(self, payload: bytes) -> bytes:
        sender = self._sender
        if sender.counter == 0:
            with self._lock:
                self._own_sessions.add(sender.session)
        sender.counter += 1
        head = _HEAD.pack(MAGIC, int(time.time() * 1000), sender.session, sender.counter)
        mac = hmac.new(self._key, head, hashlib.sha256)
        mac.update(payload)
        return head + mac.digest() + payload

    def open(self, frame: bytes | memoryview) -> bytes:
        """The payload of a sealed frame; FrameRejected (counted) when it must be dropped."""
        try:
            return self._open(memoryview(frame))
        except FrameRejected:
            with self._lock:
                self.num_rejected += 1
            raise

    def _open(self, frame: memoryview) -> bytes:
        if len(frame) < TAG_BYTES or frame[:4] != MAGIC:
            raise FrameRejected(
                f"a {self.channel} message came without an authentication tag; the sender does not "
                "use the cluster secret (give every router and worker the same --cluster-secret-file)"
            )
        head, tag, payload = frame[: _HEAD.size], frame[_HEAD.size : TAG_BYTES], frame[TAG_BYTES:]
        mac = hmac.new(self._key, head, hashlib.sha256)
        mac.update(payload)
        if not hmac.compare_digest(mac.digest(), tag):
            raise FrameRejected(
                f"a {self.channel} message has a wrong authentication tag: the sender holds a "
                "different cluster secret, or the message was altered"
            )
        _, stamp_ms, session, counter = _HEAD.unpack(head)
        self._check_fresh(session, counter, stamp_ms / 1000.0)
        return payload.tobytes()

    def _check_fresh(self, session: bytes, counter: int, stamp: float) -> None:
        now = time.monotonic()
        with self._lock:
            if session in self._own_sessions:
                raise FrameRejected(f"a {self.channel} message came back to its sender (a reflected frame)")
            if now - self._pruned_at > SESSION_IDLE_S / 4:
                self._prune(now)
            skew = abs(time.time() - stamp)
            if skew > MAX_CLOCK_SKEW_S:
                raise FrameRejected(
                    f"a {self.channel} message is stamped {skew:.0f} s away from this host's clock "
                    f"(more than {MAX_CLOCK_SKEW_S:.0f} s): a replayed old message, or clocks out "
                    "of sync (run NTP on every host)"
                )
            known = self._sessions.get(session)
            if known is None:
                self._sessions[session] = _Session(counter, 1, now)
                return
            if counter > known.highest:
                shift = counter - known.highest
                known.seen = ((known.seen << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
                known.highest = counter
            else:
                age = known.highest - counter
                if age >= REPLAY_WINDOW or (known.seen >> age) & 1:
                    raise FrameRejected(f"a {self.channel} message arrived twice (a replay); dropped")
                known.seen |= 1 << age
            known.last_seen = now

    def _prune(self, now: float) -> None:
        self._pruned_at = now
        for session in [s for s, state in self._sessions.items() if now - state.last_seen > SESSION_IDLE_S]:
            del self._sessions[session]


def check_secret(secret: bytes) -> None:
    if not MIN_SECRET_BYTES <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(
            f"the cluster secret has {len(secret)} bytes; it needs {MIN_SECRET_BYTES} to "
            f"{MAX_SECRET_BYTES} (e.g. `openssl rand -hex 32 > secret`)"
        )


def load_cluster_secret(path: str | None = None) -> bytes | None:
    """The cluster secret: from the file at `path` (--cluster-secret-file), else from the
    file named by PDSERVE_CLUSTER_SECRET_FILE, else PDSERVE_CLUSTER_SECRET itself; None when
    none is set. Surrounding whitespace (a trailing newline) is not part of it. ValueError
    saying what to fix when it cannot be read or is too short."""
    path = path or os.environ.get(SECRET_FILE_ENV) or None
    if path is not None:
        try:
            with open(path, "rb") as f:
                secret = f.read(MAX_SECRET_BYTES + 1024).strip()
        except OSError as e:
            raise ValueError(f"cannot read the cluster secret file {path}: {e.strerror}") from None
        where = f"the cluster secret file {path}"
    else:
        text = os.environ.get(SECRET_ENV)
        if not text:
            return None
        secret = text.encode().strip()
        where = f"${SECRET_ENV}"
    try:
        check_secret(secret)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return secret


def frame_auth(secret: bytes | None, channel: str) -> FrameAuth | None:
    return None if secret is None else FrameAuth(secret, channel)


# The secret of this process, for the parts built far from the command line (the KV
# side channel inside the connectors); set once at start by the worker's entry point.
_installed: dict[str, FrameAuth] = {}
_installed_secret: list[bytes | None] = [None]
_installed_lock = threading.Lock()


def install_cluster_secret(secret: bytes | None) -> None:
    """Make `secret` this process's cluster secret (None: messages go unauthenticated)."""
    with _installed_lock:
        _installed_secret[0] = secret
        _installed.clear()


def installed_frame_auth(channel: str) -> FrameAuth | None:
    """This process's FrameAuth for `channel`, or None when no secret is installed."""
    secret = _installed_secret[0]
    if secret is None:
        return None
    with _installed_lock:
        auth = _installed.get(channel)
        if auth is None:
            auth = _installed[channel] = FrameAuth(secret, channel)
        return auth
