"""A shaped network link for benchmarks: a TCP proxy adding latency and a bandwidth cap.

This kernel has no ``netem``, so the registry is put behind this proxy instead:

    python3 contrib/bench/netshape.py --listen 127.0.0.1:6000 --upstream 127.0.0.1:5000 \\
        --rtt-ms 20 --mbit 100 [--verify]

Each direction delays every byte by half the round-trip time (propagation), and
all connections share one token bucket per direction (the link's bandwidth), so
a request/response costs at least one RTT, a new connection one more (the TCP
handshake), and N bytes at least N / bandwidth.  Like a real link, it carries
bytes only while the receiver takes them (TCP flow control): a client that
stops reading stops the flow after its receive window (plus ``SEND_BUFFER``),
instead of the link carrying on into the proxy's memory.  ``--verify`` measures both
through the running link and prints them.
"""

import argparse
import asyncio
import socket
import threading
import time

CHUNK = 64 << 10
SEND_BUFFER = 64 << 10      # kernel send buffer of the proxy's sockets
MAX_UNDELIVERED = 128 << 10  # bytes read from a side but not yet handed to the other


class _Direction:
    """One direction of the link: a FIFO that releases bytes at the link's rate."""

    def __init__(self, delay, rate):
        self.delay = delay                  # one-way propagation delay, seconds
        self.rate = rate                    # bytes per second (0 = unlimited)
        self.free_at = 0.0                  # when the link finishes its queued bytes

    def departure(self, size, now):
        """When ``size`` bytes sent at ``now`` arrive at the other end."""
        if self.rate:
            start = max(now, self.free_at)
            self.free_at = start + size / self.rate
            return self.free_at + self.delay
        return now + self.delay


class Shaper:
    """Proxy ``listen`` -> ``upstream`` with the given RTT and bandwidth."""

    def __init__(self, upstream, rtt_ms=20.0, mbit=100.0, listen=("127.0.0.1", 0)):
        self.upstream = upstream
        self.rtt = rtt_ms / 1000.0
        rate = mbit * 1e6 / 8 if mbit else 0
        self.down = _Direction(self.rtt / 2, rate)
        self.up = _Direction(self.rtt / 2, rate)
        self.listen = listen
        self.bytes_down = 0
        self.bytes_up = 0
        self.connections = 0
        self._loop = None
        self._server = None
        self._thread = None
        self._writers = set()
        self.address = None

    async def _pump(self, reader, writer, direction, counter):
        queue = asyncio.Queue()
        undelivered = [0]
        delivered = asyncio.Event()
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)

        async def deliver():
            while True:
                due, data = await queue.get()
                if data is None:
                    break
                wait = due - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                undelivered[0] -= len(data)
                delivered.set()
            writer.close()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                setattr(self, counter, getattr(self, counter) + len(data))
                queue.put_nowait((direction.departure(len(data), self._loop.time()), data))
                undelivered[0] += len(data)
                backlog = direction.free_at - self._loop.time()
                if backlog > 0.25:                  # read on only as the link drains
                    await asyncio.sleep(backlog - 0.25)
                while undelivered[0] > MAX_UNDELIVERED:     # the receiver is not reading:
                    delivered.clear()                       # the link carries nothing more
                    await delivered.wait()
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((0, None))
        try:
            await sender
        except (ConnectionError, OSError):
            pass

    async def _handle(self, client_reader, client_writer):
        self.connections += 1
        self._writers.add(client_writer)
        try:
            await asyncio.sleep(self.rtt)           # the TCP handshake's round trip
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                client_writer.close()
                return
            self._writers.add(up_writer)
            try:
                await asyncio.gather(
                    self._pump(client_reader, up_writer, self.up, "bytes_up"),
                    self._pump(up_reader, client_writer, self.down, "bytes_down"))
            finally:
                self._writers.discard(up_writer)
        finally:
            self._writers.discard(client_writer)

    def start(self):
        """Serve in a background thread; returns ``"host:port"``."""
        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, *self.listen))
            self.address = self._server.sockets[0].getsockname()[:2]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="netshape")
        self._thread.start()
        ready.wait(10)
        return f"{self.address[0]}:{self.address[1]}"

    def stop(self):
        if self._loop is None:
            return

        async def shutdown():
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in list(self._writers):
                writer.close()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        except Exception:           # noqa: BLE001 - stopping anyway
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def verify(host, port, path="/v2/", download_path=None):
    """Measure one HTTP round trip on a warm connection and, optionally, a download rate.

    Returns ``{"rtt_ms": ..., "mbit": ...}`` as seen through the link.
    """
    import http.client
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("GET", path)
    conn.getresponse().read()                       # opens the connection
    samples = []
    for _ in range(5):
        start = time.monotonic()
        conn.request("GET", path)
        conn.getresponse().read()
        samples.append(time.monotonic() - start)
    result = {"rtt_ms": round(min(samples) * 1000, 1)}
    if download_path:
        start = time.monotonic()
        conn.request("GET", download_path)
        size = len(conn.getresponse().read())
        elapsed = time.monotonic() - start - min(samples)
        result["mbit"] = round(size * 8 / elapsed / 1e6, 1)
        result["bytes"] = size
    conn.close()
    return result


def _hostport(text):
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0))
    parser.add_argument("--upstream", type=_hostport, required=True)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--mbit", type=float, default=100.0)
    parser.add_argument("--verify", metavar="PATH", nargs="?", const="/v2/",
                        help="measure a round trip (and, with PATH of a large blob, the rate)")
    args = parser.parse_args()
    shaper = Shaper(args.upstream, args.rtt_ms, args.mbit, args.listen)
    address = shaper.start()
    print(f"shaping {address} -> {args.upstream[0]}:{args.upstream[1]}: "
          f"{args.rtt_ms} ms RTT, {args.mbit} Mbit/s", flush=True)
    if args.verify:
        host, port = _hostport(address)
        print(verify(host, port, "/v2/", args.verify if args.verify != "/v2/" else None))
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        shaper.stop()


if __name__ == "__main__":
    socket.setdefaulttimeout(60)
    main()
