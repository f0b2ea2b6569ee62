"""A TCP proxy to Redis on 127.0.0.1 that loses replies, or refuses connections, on cue.

It forwards bytes both ways unchanged. Told to, it cuts the connection of the next
command that contains a marker: after forwarding it to Redis (the command runs, its
reply is lost: ``lose="reply"``) or before (the command never reaches Redis:
``lose="command"``). While ``refusing`` is set it accepts connections and closes them
at once. It counts the commands it forwarded that contain the marker.

Example::

    with RedisProxy(redis_port) as proxy:
        proxy.cut_next(b"LPUSH", lose="reply")
        taskserve.connect(f"redis://127.0.0.1:{proxy.port}/0")
        ...
        proxy.forwarded(b"LPUSH")      # how many reached Redis
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from typing import Optional


class RedisProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.cut: Optional[tuple[bytes, str]] = None
        self.counts: Counter = Counter()
        self.refusing = threading.Event()
        self.sockets: set[socket.socket] = set()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> "RedisProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed.set()
        self.listener.close()

    def cut_next(self, marker: bytes, lose: str = "reply", then_refuse: bool = False) -> None:
        """Cut the connection of the next command containing ``marker`` (see the module);
        ``then_refuse``: and every other connection, refusing new ones until ``refusing``
        is cleared (Redis unreachable just after)."""
        with self.lock:
            self.cut = (marker, lose, then_refuse)

    def _cut_everything(self) -> None:
        self.refusing.set()
        with self.lock:
            sockets, self.sockets = list(self.sockets), set()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def forwarded(self, marker: bytes) -> int:
        with self.lock:
            return self.counts[marker]

    def watch(self, marker: bytes) -> None:
        """Count the commands containing ``marker`` that reach Redis."""
        with self.lock:
            self.counts.setdefault(marker, 0)

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing.is_set():
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.sockets.update((client, server))
            pair = {"cut": False, "replied": threading.Event()}
            threading.Thread(target=self._upstream, args=(client, server, pair), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, pair), daemon=True).start()

    def _upstream(self, client: socket.socket, server: socket.socket, pair: dict) -> None:
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                with self.lock:
                    cut = self.cut if self.cut and self.cut[0] in data else None
                    if cut:
                        self.cut = None
                if cut:
                    pair["cut"] = True          # nothing more reaches the client
                    if cut[1] == "command":
                        if cut[2]:
                            self._cut_everything()
                        break
                server.sendall(data)
                with self.lock:
                    for marker in self.counts:
                        self.counts[marker] += data.count(marker)
                if cut:                 # forwarded: Redis runs it; its reply is lost
                    pair["replied"].wait(5)
                    if cut[2]:
                        self._cut_everything()
                    break
        except OSError:
            pass
        finally:
            for sock in (client, server):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _downstream(self, server: socket.socket, client: socket.socket, pair: dict) -> None:
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                if pair["cut"]:
                    pair["replied"].set()
                    break
                client.sendall(data)
        except OSError:
            pass
