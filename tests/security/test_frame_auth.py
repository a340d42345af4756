"""The cluster secret's frame tags (common/frame_auth.py): only holders of the same
secret and channel are believed, a frame counts once, and old frames stay refused."""

from __future__ import annotations

import struct
import threading
import time

import pytest

from common import frame_auth
from common.frame_auth import (
    SIDE_CHANNEL,
    TAG_BYTES,
    WORKER_CHANNEL,
    FrameAuth,
    FrameRejected,
    load_cluster_secret,
)

SECRET = b"0123456789abcdef-cluster-secret"
OTHER = b"fedcba9876543210-another-secret"


def test_a_sealed_frame_opens_to_its_payload_under_the_same_secret():
    sender, receiver = FrameAuth(SECRET, WORKER_CHANNEL), FrameAuth(SECRET, WORKER_CHANNEL)
    sealed = sender.seal(b"\x81\xa4type\xa5hello")
    assert len(sealed) == TAG_BYTES + len(b"\x81\xa4type\xa5hello")
    assert receiver.open(sealed) == b"\x81\xa4type\xa5hello"
    assert receiver.open(memoryview(sender.seal(b""))) == b""


@pytest.mark.parametrize(
    "frame, reason",
    [
        (b"\x81\xa4type\xa5hello", "without an authentication tag"),
        (FrameAuth(OTHER, WORKER_CHANNEL).seal(b"payload"), "wrong authentication tag"),
        (FrameAuth(SECRET, SIDE_CHANNEL).seal(b"payload"), "wrong authentication tag"),
        (b"PDA1" + b"\x00" * 10, "without an authentication tag"),
    ],
    ids=["plain msgpack", "another secret", "another channel", "truncated tag"],
)
def test_frames_without_a_valid_tag_are_rejected_and_counted(frame, reason):
    receiver = FrameAuth(SECRET, WORKER_CHANNEL)
    with pytest.raises(FrameRejected, match=reason):
        receiver.open(frame)
    assert receiver.num_rejected == 1


@pytest.mark.parametrize("position", [0, 5, 14, 22, 40, TAG_BYTES, TAG_BYTES + 3])
def test_any_altered_byte_breaks_the_tag(position):
    sealed = bytearray(FrameAuth(SECRET, WORKER_CHANNEL).seal(b"generate request"))
    sealed[position] ^= 0x01
    with pytest.raises(FrameRejected):
        FrameAuth(SECRET, WORKER_CHANNEL).open(bytes(sealed))


def test_a_replayed_frame_is_rejected_even_after_later_ones():
    sender, receiver = FrameAuth(SECRET, WORKER_CHANNEL), FrameAuth(SECRET, WORKER_CHANNEL)
    first, second, third = (sender.seal(b"m%d" % i) for i in range(3))
    receiver.open(first)
    receiver.open(second)
    with pytest.raises(FrameRejected, match="replay"):
        receiver.open(second)
    receiver.open(third)
    with pytest.raises(FrameRejected, match="replay"):
        receiver.open(first)


def test_frames_that_arrive_out_of_order_count_once_each():
    sender, receiver = FrameAuth(SECRET, WORKER_CHANNEL), FrameAuth(SECRET, WORKER_CHANNEL)
    frames = [sender.seal(b"%d" % i) for i in range(50)]
    for frame in [frames[0], *reversed(frames[1:])]:
        receiver.open(frame)
    with pytest.raises(FrameRejected, match="replay"):
        receiver.open(frames[17])


def test_a_frame_far_behind_the_window_is_rejected():
    sender, receiver = FrameAuth(SECRET, WORKER_CHANNEL), FrameAuth(SECRET, WORKER_CHANNEL)
    late = sender.seal(b"late")
    frames = [sender.seal(b"x") for _ in range(frame_auth.REPLAY_WINDOW + 1)]
    receiver.open(frames[0])
    receiver.open(frames[-1])
    with pytest.raises(FrameRejected, match="replay"):
        receiver.open(late)


def test_an_old_frame_is_rejected_by_a_receiver_that_never_saw_its_sender(monkeypatch):
    sender = FrameAuth(SECRET, WORKER_CHANNEL)
    now = time.time()
    monkeypatch.setattr(frame_auth.time, "time", lambda: now - frame_auth.MAX_CLOCK_SKEW_S - 5)
    old = sender.seal(b"captured long ago")
    monkeypatch.setattr(frame_auth.time, "time", lambda: now)
    with pytest.raises(FrameRejected, match="clock"):
        FrameAuth(SECRET, WORKER_CHANNEL).open(old)


def test_a_forgotten_idle_session_cannot_be_replayed(monkeypatch):
    """After SESSION_IDLE_S of silence a session is forgotten; its old frames are too old by then."""
    sender, receiver = FrameAuth(SECRET, WORKER_CHANNEL), FrameAuth(SECRET, WORKER_CHANNEL)
    captured = sender.seal(b"hello")
    receiver.open(captured)
    later_wall = time.time() + frame_auth.SESSION_IDLE_S + 1
    later_mono = time.monotonic() + frame_auth.SESSION_IDLE_S + 1
    monkeypatch.setattr(frame_auth.time, "time", lambda: later_wall)
    monkeypatch.setattr(frame_auth.time, "monotonic", lambda: later_mono)
    receiver.open(sender.seal(b"keeps the receiver pruning"))  # a fresh frame still passes
    with pytest.raises(FrameRejected):
        receiver.open(captured)


def test_a_frame_reflected_to_its_sender_is_rejected():
    auth = FrameAuth(SECRET, WORKER_CHANNEL)
    with pytest.raises(FrameRejected, match="reflected"):
        auth.open(auth.seal(b"hello"))


def test_each_sending_thread_is_its_own_session_so_interleaving_loses_nothing():
    sender, receiver = FrameAuth(SECRET, WORKER_CHANNEL), FrameAuth(SECRET, WORKER_CHANNEL)
    sealed: list[list[bytes]] = [[], []]

    def seal_many(out: list[bytes]) -> None:
        out.extend(sender.seal(b"x") for _ in range(200))

    threads = [threading.Thread(target=seal_many, args=(out,)) for out in sealed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sessions = {struct.unpack(">4sQ8sQ", frames[0][:28])[2] for frames in sealed}
    assert len(sessions) == 2
    # one thread's frames all arrive after the other's: none is taken for a replay
    for frame in [*sealed[1], *sealed[0]]:
        receiver.open(frame)
    assert receiver.num_rejected == 0


def test_the_secret_comes_from_the_file_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(frame_auth.SECRET_ENV, raising=False)
    monkeypatch.delenv(frame_auth.SECRET_FILE_ENV, raising=False)
    assert load_cluster_secret(None) is None
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    assert load_cluster_secret(str(path)) == SECRET
    monkeypatch.setenv(frame_auth.SECRET_ENV, OTHER.decode())
    assert load_cluster_secret(None) == OTHER
    assert load_cluster_secret(str(path)) == SECRET  # the flag wins
    monkeypatch.setenv(frame_auth.SECRET_FILE_ENV, str(path))
    assert load_cluster_secret(None) == SECRET


def test_a_short_or_missing_secret_is_refused_with_what_to_do(tmp_path, monkeypatch):
    short = tmp_path / "short"
    short.write_text("tiny\n")
    with pytest.raises(ValueError, match="16 to .*openssl rand"):
        load_cluster_secret(str(short))
    with pytest.raises(ValueError, match="cannot read the cluster secret file"):
        load_cluster_secret(str(tmp_path / "absent"))
    monkeypatch.delenv(frame_auth.SECRET_FILE_ENV, raising=False)
    monkeypatch.setenv(frame_auth.SECRET_ENV, "short")
    with pytest.raises(ValueError, match="PDSERVE_CLUSTER_SECRET"):
        load_cluster_secret(None)


def test_the_installed_secret_seals_the_kv_side_channel_messages():
    from kvtransfer import side_channel

    message = {"type": "done", "xid": 1, "request_id": "r"}
    plain = side_channel.encode(message)
    try:
        frame_auth.install_cluster_secret(SECRET)
        sealed = side_channel.encode(message)
        assert sealed[:4] == b"PDA1" and sealed.endswith(plain)
        # another process with the same secret reads it; a plain frame is refused
        assert FrameAuth(SECRET, SIDE_CHANNEL).open(sealed) == plain
        with pytest.raises(side_channel.Unauthenticated):
            side_channel.decode(plain)
        assert side_channel.decode(FrameAuth(SECRET, SIDE_CHANNEL).seal(plain)) == message
    finally:
        frame_auth.install_cluster_secret(None)
    assert side_channel.decode(plain) == message
