"""Worked example: a Python dataplane that uses vhostpath as its path to the kernel.

It owns the NIC (a packet socket), answers ICMP echo requests to one address
itself, and hands every other frame to the kernel through tap0 (a virtio-user
port), which answers ARP, TCP and the rest; what the kernel sends goes out of
the NIC.  Its replies carry a marker the kernel would not put there: IP TTL
MARK_TTL.  It waits on both sides with ``selectors`` or ``asyncio``:

    sudo python3 tests/example_responder.py --iface eth1 --address 192.0.2.1/24
    sudo python3 tests/example_responder.py --iface eth1 --address 192.0.2.1/24 --loop asyncio

It prints "ready" once both sides are up and its counters when SIGINT or
SIGTERM stops it.  Run by the tests (ExampleCase in tests/cases.py).
"""

import argparse
import asyncio
import ipaddress
import os
import selectors
import signal
import struct
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import vhostpath as vp  # noqa: E402

MARK_TTL = 222              # the kernel's replies carry 64
ETH_P_IP, IPPROTO_ICMP, ICMP_ECHO, ICMP_ECHOREPLY = 0x0800, 1, 8, 0


def checksum(data):
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_reply(frame, address):
    """The echo reply to ``frame`` if it is an IPv4 ICMP echo request to ``address``
    (4 bytes) with its checksums done (no offload state): bytes, else None."""
    if len(frame.data) < 14 + 20 + 8 or frame.gso_type or frame.needs_csum:
        return None
    data = bytearray(frame.data)
    ihl = (data[14] & 0x0F) * 4
    if (struct.unpack_from("!H", data, 12)[0] != ETH_P_IP or data[14] >> 4 != 4
            or data[23] != IPPROTO_ICMP or data[30:34] != address
            or len(data) < 14 + ihl + 8 or data[14 + ihl] != ICMP_ECHO):
        return None
    data[0:6], data[6:12] = data[6:12], data[0:6]                   # MACs swapped
    data[26:30], data[30:34] = data[30:34], data[26:30]             # IPs swapped
    data[22] = MARK_TTL
    data[24:26] = b"\0\0"
    data[24:26] = struct.pack("!H", checksum(data[14:14 + ihl]))
    icmp = 14 + ihl
    end = 14 + struct.unpack_from("!H", data, 16)[0]
    data[icmp] = ICMP_ECHOREPLY
    data[icmp + 2:icmp + 4] = b"\0\0"
    data[icmp + 2:icmp + 4] = struct.pack("!H", checksum(data[icmp:end]))
    return bytes(data)


class Responder:
    """The two sides and what moves between them.  Nothing is dropped here: frames
    a full ring or socket buffer did not take wait (``for_kernel``,
    ``for_nic``), and meanwhile their source is not read, so the backlog is one
    batch at most; the kernel drops, and counts, what cannot wait in its own
    queues.  ``wanted()`` says which fds to wait on now, for either loop."""

    def __init__(self, iface, address, config):
        self.address = ipaddress.ip_interface(address).ip.packed
        self.nic = vp.PacketSocket(iface)
        try:
            self.port = (vp.VirtioUserPort(config) if config.tap_io == "vhost-net"
                         else vp.TapPort(config))
            self.quiet = vp.QuietNic(iface)   # the NIC's own stack silent meanwhile
        except BaseException:
            self.nic.close()
            raise
        self.for_kernel, self.for_nic = [], []
        self.kernel_unread = False          # the port signalled while for_nic waited
        self.answered = self.to_kernel = self.to_nic = 0

    def wanted(self):
        """{(fd, "read" or "write"): what to call when it is ready}."""
        want = {}
        if self.for_kernel:                 # the port's ring was full: wait for room
            want[(self.port.tx_fileno(), "read")] = self.to_port
        if self.for_nic:                    # the NIC's socket buffer was full
            want[(self.nic.fileno(), "write")] = self.nic_writable
        else:
            want[(self.port.fileno(), "read")] = self.from_kernel
            if not self.for_kernel:
                want[(self.nic.fileno(), "read")] = self.from_nic
        return want

    def from_nic(self):
        """A batch the NIC received: echo requests to us answered, the rest to the
        kernel.  The socket polls readable while more wait (level-triggered)."""
        for frame in self.nic.recv_frames():
            reply = echo_reply(frame, self.address)
            if reply is None:
                self.for_kernel.append(frame)
            else:
                self.answered += 1
                self.for_nic.append(reply)
        self.to_port()
        self.out()

    def to_port(self):
        taken = self.port.send_frames(self.for_kernel)
        self.to_kernel += taken
        del self.for_kernel[:taken]

    def out(self):
        taken = self.nic.send_frames(self.for_nic)
        self.to_nic += taken
        del self.for_nic[:taken]

    def from_kernel(self):
        """What the kernel sent, out of the NIC: read until [], since the port's fd (an
        eventfd) signals once per batch of news; paused while frames for the NIC
        wait."""
        while not self.for_nic:
            self.for_nic = self.port.recv_frames()
            if not self.for_nic:
                self.kernel_unread = False
                return
            self.out()
        self.kernel_unread = True

    def nic_writable(self):
        self.out()
        if not self.for_nic and self.kernel_unread:
            self.from_kernel()

    def close(self):
        self.quiet.restore()
        self.port.close()
        self.nic.close()

    def report(self):
        return (f"answered {self.answered}, to kernel {self.to_kernel}, to NIC {self.to_nic}, "
                f"waiting {len(self.for_kernel) + len(self.for_nic)}")


def run_selectors(responder):
    """Wait on both sides with a selector until SIGINT or SIGTERM."""
    stop_r, stop_w = os.pipe()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: os.write(stop_w, b"x"))
    events = {"read": selectors.EVENT_READ, "write": selectors.EVENT_WRITE}
    with selectors.DefaultSelector() as sel:
        sel.register(stop_r, selectors.EVENT_READ)
        watched = {}                        # fd -> events registered
        print("ready", flush=True)
        while True:
            want = responder.wanted()
            masks = {}
            for fd, kind in want:
                masks[fd] = masks.get(fd, 0) | events[kind]
            for fd in set(watched) | set(masks):
                if fd not in masks:
                    sel.unregister(fd)
                elif fd not in watched:
                    sel.register(fd, masks[fd])
                elif watched[fd] != masks[fd]:
                    sel.modify(fd, masks[fd])
            watched = masks
            for key, ready in sel.select():
                if key.fd == stop_r:
                    return
                for kind, event in events.items():
                    if ready & event and (key.fd, kind) in want:
                        want[key.fd, kind]()


def run_asyncio(responder):
    """The same with asyncio: readers and writers as wanted() says, after each call
    (Python 3.6's API too)."""
    loop = asyncio.new_event_loop()
    watched = set()

    def call(callback):
        callback()
        rewatch()

    def rewatch():
        want = responder.wanted()
        for fd, kind in watched - set(want):
            (loop.remove_reader if kind == "read" else loop.remove_writer)(fd)
        for (fd, kind), callback in want.items():
            (loop.add_reader if kind == "read" else loop.add_writer)(fd, call, callback)
        watched.clear()
        watched.update(want)

    try:
        stopped = loop.create_future()
        rewatch()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: stopped.done() or stopped.set_result(None))
        print("ready", flush=True)
        loop.run_until_complete(stopped)
    finally:
        loop.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iface", required=True, help="the NIC")
    p.add_argument("--address", required=True,
                   help="the kernel side's IPv4 address/prefix, given to the tap; echo "
                        "requests to it are answered here")
    p.add_argument("--loop", choices=("selectors", "asyncio"), default="selectors")
    p.add_argument("--tap-io", choices=vp.Config.TAP_IO, default="vhost-net")
    args = p.parse_args(argv)
    try:
        config = vp.Config(tap_io=args.tap_io, address=[args.address])
        responder = Responder(args.iface, args.address, config)
    except (vp.VhostPathError, OSError, ValueError) as e:
        print(f"example_responder: {e}", file=sys.stderr)
        return 1
    try:
        (run_asyncio if args.loop == "asyncio" else run_selectors)(responder)
    finally:
        responder.close()
    print(responder.report(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
