"""A small threaded TCP proxy a test owns, to simulate outages of a server it must not touch.

    proxy = TcpProxy("127.0.0.1", 5432).start()
    ...connect processes to 127.0.0.1:proxy.port...
    proxy.cut()       # close every connection (RST) and refuse new ones: "server down"
    proxy.pause()     # keep connections open but forward nothing: a network partition
    proxy.restore()   # forward again (a paused connection resumes where it stopped)
    proxy.close()

Refused connections are accepted and reset at once, so the listening port stays ours.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType

FORWARD = "forward"
CUT = "cut"
PAUSE = "pause"


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees "connection reset" at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.mode = FORWARD
        #: connections accepted and forwarded / accepted and refused, since the start
        self.accepted = 0
        self.refused = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen_host, 0))
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener = listener
        self._thread(self._accept_loop, "accept")
        return self

    @property
    def port(self) -> int:
        assert self._listener is not None, "start() the proxy first"
        return int(self._listener.getsockname()[1])

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        if self._listener is not None:
            self._listener.close()
        self._drop_all()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> TcpProxy:
        return self.start() if self._listener is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- outages ----------------------------------------------------------------------------
    def cut(self) -> None:
        """Server down: reset every open connection and refuse new ones until restore()."""
        self.mode = CUT
        self._flowing.set()  # paused pumps must notice the cut
        self._drop_all()

    def pause(self) -> None:
        """Partition: connections stay open but no byte goes through until restore()."""
        self.mode = PAUSE
        self._flowing.clear()

    def restore(self) -> None:
        self.mode = FORWARD
        self._flowing.set()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._sockets) // 2

    # -- internals --------------------------------------------------------------------------
    def _thread(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=f"tcp-proxy-{name}", daemon=True)
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _drop_all(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
            self._sockets.clear()
        for sock in sockets:
            _reset(sock)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self.mode == CUT:
                self.refused += 1
                _reset(client)
                continue
            self.accepted += 1
            self._thread(self._connect, "connect", client)

    def _connect(self, client: socket.socket) -> None:
        # A connection made during a pause waits, like a SYN into a partition would.
        self._flowing.wait()
        if self.mode == CUT or self._closed.is_set():
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets.update((client, upstream))
        self._thread(self._pump, "up", client, upstream)
        self._thread(self._pump, "down", upstream, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()  # bytes read just before a pause wait for restore()
                if self.mode == CUT or self._closed.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.discard(src)
                self._sockets.discard(dst)
            _reset(src)
            _reset(dst)
