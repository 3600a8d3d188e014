"""
A misbehaving AMP peer for ``test_faults.py``: it stops at a chosen point and waits to be killed.

Usage::

    python fault_peer.py connect PORT FAULT   # connect to 127.0.0.1:PORT and send a fault
    python fault_peer.py serve FAULT COUNT    # listen on 127.0.0.1, print "port N", read
                                              # COUNT boxes, then answer the first with a fault

FAULT is one of:

* ``call``: a complete call (``Hang`` when connecting); when serving, no answer at all;
* ``box``: the first half of a box (a ``Sum`` call, or an answer to the first call);
* ``bigbytes``: a box whose BigBytes value spans three keys (``data``, ``data.2``,
  ``data.3``: an ``Upload`` call, or an answer to the first call), cut inside ``data.3``.

Once the fault is written the peer prints ``ready``. It then reads and discards what
it is sent, printing ``read`` after each chunk, so that when it is killed its socket
holds no unread bytes and the kernel ends the connection with a FIN, after every byte
already written. It gives up by itself after two minutes.

It uses blocking sockets and asyncio_amp's box codec only, so that the program under
test does no work here.
"""

from __future__ import annotations

import socket
import sys

from asyncio_amp import BoxDecoder, encode_box

HOST = "127.0.0.1"
GIVE_UP = 120.0

#: The size of the BigBytes value the ``bigbytes`` fault carries: three chunks.
BIG_SIZE = 2 * 65_535 + 10_000
#: How many bytes of the ``bigbytes`` box are left unsent.
BIG_CUT = 1_000


def big_data() -> bytes:
    """The BigBytes value of the ``bigbytes`` fault (a recognisable pattern)."""
    return bytes(i % 251 for i in range(BIG_SIZE))


def big_box(first: tuple[bytes, bytes], second: tuple[bytes, bytes] | None = None) -> bytes:
    """A whole box carrying ``big_data()`` split as BigBytes does: data, data.2, data.3."""
    data = big_data()
    box = {
        first[0]: first[1],
        b"data": data[:65_535],
        b"data.2": data[65_535:131_070],
        b"data.3": data[131_070:],
    }
    if second is not None:
        box[second[0]] = second[1]
    return encode_box(box)


def upload_box() -> bytes:
    """A whole ``Upload`` call with tag 1 and ``big_data()`` as its argument."""
    return big_box((b"_ask", b"1"), (b"_command", b"Upload"))


def sum_box() -> bytes:
    """A whole ``Sum`` call, 1 + 2, with tag 1."""
    return encode_box({b"_ask": b"1", b"_command": b"Sum", b"a": b"1", b"b": b"2"})


def connect_payload(fault: str) -> bytes:
    """What the peer writes after connecting."""
    if fault == "call":
        return encode_box({b"_ask": b"1", b"_command": b"Hang"})
    if fault == "box":
        box = sum_box()
        return box[: len(box) // 2]
    if fault == "bigbytes":
        return upload_box()[:-BIG_CUT]
    raise SystemExit(f"unknown fault {fault!r}")


def answer_payload(fault: str, tag: bytes) -> bytes:
    """What the serving peer writes once it has read the calls."""
    if fault == "call":
        return b""
    if fault == "box":
        box = encode_box({b"_answer": tag, b"data": b"0123456789"})
        return box[: len(box) // 2]
    if fault == "bigbytes":
        return big_box((b"_answer", tag))[:-BIG_CUT]
    raise SystemExit(f"unknown fault {fault!r}")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def drain(sock: socket.socket) -> None:
    """Read and discard until the other side closes, saying ``read`` after each chunk."""
    while sock.recv(65_536):
        say("read")


def connect(port: int, fault: str) -> None:
    with socket.create_connection((HOST, port), timeout=GIVE_UP) as sock:
        sock.sendall(connect_payload(fault))
        say("ready")
        drain(sock)


def serve(fault: str, count: int) -> None:
    with socket.create_server((HOST, 0)) as listener:
        listener.settimeout(GIVE_UP)
        say(f"port {listener.getsockname()[1]}")
        conn, _ = listener.accept()
    with conn:
        conn.settimeout(GIVE_UP)
        decoder = BoxDecoder()
        boxes: list[dict[bytes, bytes]] = []
        while len(boxes) < count:
            data = conn.recv(65_536)
            if not data:
                raise SystemExit(f"closed after {len(boxes)} of {count} boxes")
            boxes += decoder.receive_data(data)
        conn.sendall(answer_payload(fault, boxes[0][b"_ask"]))
        say("ready")
        drain(conn)


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "connect":
        connect(int(argv[1]), argv[2])
    elif len(argv) == 3 and argv[0] == "serve":
        serve(argv[1], int(argv[2]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
