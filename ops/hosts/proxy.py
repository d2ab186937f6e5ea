"""A small userspace TCP proxy that shapes a link: delay, jitter and loss.

This kernel has no ``netem``, so a link's delay and loss are made here, on the TCP streams
that cross it. Two ways to run it (one asyncio process each):

* ``--transparent PORT`` inside a worker host's namespace: the host's nftables rule
  redirects every TCP connection to the core's address to ``127.0.0.1:PORT``; the proxy
  reads where the connection was going (``SO_ORIGINAL_DST``) and opens it itself, marked
  with ``--mark`` so that the rule lets it through. Programs on the host use the core's real
  addresses (also the ones Redis Sentinel hands out) and never see the proxy.
* ``--relay LISTEN=TARGET`` (repeatable), on the core: a plain forwarder that publishes a
  service listening on loopback only (the test chain node, IPFS) on the core's address.

Shaping, per direction of each connection (``--delay``/``--jitter`` in ms, ``--loss`` a
probability per packet):

* every chunk read is written to the other side ``delay ± jitter`` later, never before the
  chunk read before it (a TCP stream stays in order: a late chunk holds up the next ones,
  as a retransmission does);
* a lost packet cannot be dropped from a stream without breaking it, so loss is rendered as
  what TCP makes of it: the chunk that held the packet arrives one retransmission timeout
  later (200 ms, Linux's minimum, plus a round trip). A chunk of n bytes holds ceil(n/1448)
  packets; a new connection loses its SYN with the same probability (then 1 s later, the
  SYN retransmission timeout).

Run ``python proxy.py --help``. It prints ``ready`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import socket
import struct
import time
from dataclasses import dataclass

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
MSS = 1448  # payload bytes of one packet on a 1500-byte link
RTO_MIN = 0.2  # Linux's minimum retransmission timeout
SYN_RTO = 1.0  # the first SYN retransmission
CHUNK = 65536


@dataclass(frozen=True)
class Shape:
    """How a link is degraded: one-way delay and jitter (seconds), packet loss (0..1)."""

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0

    @property
    def active(self) -> bool:
        return self.delay > 0 or self.jitter > 0 or self.loss > 0

    def late_by(self, size: int, rng: random.Random) -> float:
        """How long after it was read a chunk of ``size`` bytes reaches the other side."""
        late = max(0.0, self.delay + rng.uniform(-self.jitter, self.jitter))
        if self.loss > 0:
            packets = max(1, math.ceil(size / MSS))
            if rng.random() < 1 - (1 - self.loss) ** packets:
                late += RTO_MIN + 2 * self.delay
        return late


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    shape: Shape,
    rng: random.Random,
) -> None:
    """Copy ``reader`` to ``writer``, each chunk released when the shape says. Reading goes
    on while earlier chunks wait (each is stamped when it arrives), so a delay does not
    slow a stream down beyond what the delay itself costs."""
    if not shape.active:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        return
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=256)

    async def read() -> None:
        released = 0.0
        try:
            while data := await reader.read(CHUNK):
                released = max(released, time.monotonic() + shape.late_by(len(data), rng))
                await queue.put((released, data))
        except (ConnectionError, OSError):
            pass
        await queue.put((released, b""))

    async def write() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                at, data = await queue.get()
                wait = at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

    await asyncio.gather(read(), write())


async def _splice(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    host: str,
    port: int,
    shape: Shape,
    mark: int | None,
    rng: random.Random,
) -> None:
    try:
        if shape.loss > 0 and rng.random() < shape.loss:
            await asyncio.sleep(SYN_RTO)  # the SYN was lost
        if shape.delay > 0:
            await asyncio.sleep(2 * shape.delay)  # SYN, SYN-ACK
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except OSError:
            sock.close()
            raise
        up_r, up_w = await asyncio.open_connection(sock=sock)
    except OSError:
        client_w.close()
        return
    try:
        await asyncio.gather(_pump(client_r, up_w, shape, rng), _pump(up_r, client_w, shape, rng))
    finally:
        for w in (up_w, client_w):
            with contextlib.suppress(Exception):
                w.close()


def _original_destination(writer: asyncio.StreamWriter) -> tuple[str, int]:
    sock = writer.get_extra_info("socket")
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack("!H", raw[2:4])[0]
    return socket.inet_ntoa(raw[4:8]), port


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


async def serve(args: argparse.Namespace) -> None:
    shape = Shape(args.delay / 1000, args.jitter / 1000, args.loss)
    rng = random.Random(args.seed)
    servers = []
    if args.transparent is not None:

        async def transparent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            host, port = _original_destination(w)
            await _splice(r, w, host, port, shape, args.mark, rng)

        servers.append(await asyncio.start_server(transparent, "127.0.0.1", args.transparent))
    for pair in args.relay:
        listen, _, target = pair.partition("=")
        lhost, lport = _split(listen)
        thost, tport = _split(target)

        async def relay(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, h: str = thost, p: int = tport
        ) -> None:
            await _splice(r, w, h, p, shape, args.mark, rng)

        servers.append(await asyncio.start_server(relay, lhost, lport, reuse_address=True))
    if not servers:
        raise SystemExit("nothing to serve: give --transparent and/or --relay")
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transparent", type=int, help="port on 127.0.0.1 the nft rule uses")
    parser.add_argument(
        "--relay", action="append", default=[], help="LISTEN_HOST:PORT=TARGET_HOST:PORT"
    )
    parser.add_argument("--mark", type=lambda v: int(v, 0), help="SO_MARK of outgoing sockets")
    parser.add_argument("--delay", type=float, default=0.0, help="one-way delay, ms")
    parser.add_argument("--jitter", type=float, default=0.0, help="± ms around the delay")
    parser.add_argument("--loss", type=float, default=0.0, help="packet loss, 0..1")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if not 0 <= args.loss < 1 or args.delay < 0 or args.jitter < 0:
        parser.error("--delay and --jitter must be >= 0 and --loss in [0, 1)")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
