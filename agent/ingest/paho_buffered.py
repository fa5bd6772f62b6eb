"""A paho client that reads the broker's socket in large chunks instead of a few bytes at a time.

paho reads every incoming packet with at least three ``recv`` calls (the command byte, each byte of the
remaining length, then the rest) and goes through ``select`` before each packet. At thousands of small
messages a second that is most of the network thread's time: draining a queued backlog of the benchmark's
vibration mix, a bare paho subscriber spent 97-137 µs of CPU per message, the same subscriber with this
client 58-67 µs (2026-12-03, two rounds, 6,000 messages each).

``BufferedClient`` changes where the bytes come from, and how often the loop is woken. ``_sock_recv``
serves paho's small reads from a buffer filled by one ``recv`` of up to ``READ_CHUNK`` bytes, and
``loop_read`` keeps handling packets while whole ones are already buffered (``select`` would not wake for
bytes that have left the socket). ``batch()`` lets the ingest thread queue a whole batch's acknowledgements
with one wake-up of the network thread instead of one per message. Packet parsing, acknowledgements, TLS
and reconnects stay paho's. It relies on private parts of paho 2.x (``_sock_recv``, ``_sock_close``,
``_sockpairW``); if a paho release renames them, ``client_class()`` falls back to the stock client, which is
slower but correct.

``LeanProperties`` takes out the largest cost paho adds per received message under MQTT 5: decoding a
PUBLISH builds a ``Properties`` object, whose constructor rebuilds its three lookup tables (about 60 entries)
and whose ``unpack`` first deletes each of the 27 property names from the fresh object (5.6 + 3.6 µs per
message, 2026-12-04; a message from a publisher that sets no properties has none to decode). It shares the
tables, built once by paho's own constructor, and skips the deletions when there is nothing to decode. It
replaces ``Properties`` only in ``paho.mqtt._packet``, the decoding of received packets.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import paho.mqtt._packet as paho_packet
import paho.mqtt.client as paho
from paho.mqtt.properties import Properties

READ_CHUNK = 65_536  # bytes per recv: a few vibration blocks, hundreds of readings
MAX_BUFFERED_PACKETS = 1_000  # packets handled from the buffer per loop_read before others get a turn


class _Muted:
    """Stands in for paho's wake-up socket while a thread queues a batch of packets (``BufferedClient.batch``)."""

    def send(self, data: bytes) -> int:
        return len(data)


_MUTED = _Muted()


class BufferedClient(paho.Client):
    """``paho.Client`` with buffered socket reads and batched wake-ups (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._batching = threading.local()
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self.socket_reads = 0  # recv calls that returned data (a test's view of the batching)

    # paho wakes its network thread after queueing each packet (a byte on a socket pair: a system call, and
    # for the calling thread a release of the interpreter lock it then waits to get back). Inside ``batch()``
    # the calling thread's packets are queued without it, and the loop is woken once at the end.
    @property
    def _sockpairW(self) -> Any:
        sock = self.__dict__.get("_pair_w")
        if sock is not None and getattr(self._batching, "on", False):
            return _MUTED
        return sock

    @_sockpairW.setter
    def _sockpairW(self, sock: Any) -> None:
        self.__dict__["_pair_w"] = sock

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Queue this thread's packets (acknowledgements) without a wake-up each; wake the loop once after."""
        self._batching.on = True
        try:
            yield
        finally:
            self._batching.on = False
            self._wake_loop()

    def _sock_recv(self, bufsize: int) -> bytes:
        buf, pos = self._rbuf, self._rpos
        if pos >= len(buf):
            # BlockingIOError (nothing to read) and OSError propagate as from paho's own read.
            buf = super()._sock_recv(max(bufsize, READ_CHUNK))
            if not buf:
                return buf  # the connection closed
            self.socket_reads += 1
            pos = 0
        end = min(pos + bufsize, len(buf))
        self._rbuf, self._rpos = buf, end
        return buf[pos:end]

    def _sock_close(self) -> None:
        # Bytes of a closed connection must not be parsed as the start of the next one.
        self._rbuf, self._rpos = b"", 0
        super()._sock_close()

    def buffered_bytes(self) -> int:
        """Bytes read from the socket that paho has not consumed yet."""
        return len(self._rbuf) - self._rpos

    def loop_read(self, max_packets: int = 1) -> paho.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        handled = 0
        while rc == paho.MQTTErrorCode.MQTT_ERR_SUCCESS and self.buffered_bytes() and self._sock is not None:
            if handled >= MAX_BUFFERED_PACKETS:
                # Let the loop write (acknowledgements, pings) and come straight back: the socket may have
                # nothing new to wake select with, so wake it through paho's own socket pair.
                self._wake_loop()
                break
            rc = super().loop_read(1)
            handled += 1
        return rc

    def _wake_loop(self) -> None:
        pair = getattr(self, "_sockpairW", None)
        if pair is not None:
            with contextlib.suppress(OSError):  # closing: the loop is ending anyway
                pair.send(b"0")


_TABLES = ("types", "names", "properties")


class LeanProperties(Properties):
    """paho's ``Properties`` with its lookup tables shared between instances (see the module docstring).

    paho reads the tables and never changes them; an instance's properties are attributes of its own.
    """

    _shared: tuple[Any, ...] | None = None

    def __init__(self, packetType: int) -> None:
        shared = LeanProperties._shared
        if shared is None:
            super().__init__(packetType)
            LeanProperties._shared = tuple(getattr(self, name) for name in _TABLES)
            return
        object.__setattr__(self, "packetType", packetType)
        for name, table in zip(_TABLES, shared, strict=True):
            object.__setattr__(self, name, table)

    def unpack(self, buffer: bytes | bytearray) -> tuple[Properties, int]:
        if buffer[:1] == b"\x00":  # a properties length of 0: nothing to decode on this fresh object
            return self, 1
        result: tuple[Properties, int] = super().unpack(buffer)
        return result


def _use_lean_properties() -> None:
    """Decode received packets' properties with ``LeanProperties``, unless this paho does not decode them in
    ``paho.mqtt._packet`` with the stock class and its tables (then nothing is changed)."""
    current = getattr(paho_packet, "Properties", None)
    if current is Properties and all(hasattr(Properties(paho.PacketTypes.PUBLISH), n) for n in _TABLES):
        setattr(paho_packet, "Properties", LeanProperties)  # noqa: B010 (a module attribute mypy sees as a class)


def client_class() -> type[paho.Client]:
    """``BufferedClient`` where this paho has the methods it builds on, else the stock client.

    Either way, received packets' properties are then decoded with ``LeanProperties`` where this paho allows it.
    """
    _use_lean_properties()
    probe = paho.Client(paho.CallbackAPIVersion.VERSION2)
    has_pair = "_sockpairW" in vars(probe)
    if has_pair and all(callable(getattr(paho.Client, n, None)) for n in ("_sock_recv", "_sock_close", "loop_read")):
        return BufferedClient
    return paho.Client
