"""A self-pipe that wakes a thread sleeping in zmq's poll() from any other thread: the
producer's side-channel thread and the consumer's I/O thread each poll one beside their
sockets."""

from __future__ import annotations

import socket


class WakePipe:
    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)  # a full pipe already holds a wake-up

    def fileno(self) -> int:
        """The end to register with a zmq.Poller (POLLIN)."""
        return self._read.fileno()

    def wake(self) -> None:
        try:
            self._write.send(b"x")
        except OSError:  # full (a wake-up is pending anyway), or closed with its owner
            pass

    def drain(self) -> None:
        """Take every pending wake-up, so the next poll() sleeps again."""
        try:
            while self._read.recv(4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._read.close()
        self._write.close()
