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
    """The two sides and what moves between them.  ``answered``: echo replies sent;
    ``to_kernel`` / ``to_nic``: frames passed on; ``lost``: frames a full NIC
    socket buffer or a full port ring refused (never silently)."""

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
        self.answered = self.to_kernel = self.to_nic = self.lost = 0

    def from_nic(self):
        """A batch the NIC received: echo requests to us answered, the rest to the
        kernel.  The socket polls readable while more wait (level-triggered)."""
        passed, replies = [], []
        for frame in self.nic.recv_frames():
            reply = echo_reply(frame, self.address)
            if reply is None:
                passed.append(frame)
            else:
                replies.append(reply)
        answered = self.nic.send_frames(replies)
        sent = self.port.send_frames(passed)
        self.answered += answered
        self.to_kernel += sent
        self.lost += len(replies) - answered + len(passed) - sent

    def from_kernel(self):
        """Everything the kernel sent, out of the NIC: read until [], since the
        port's fd (an eventfd) signals once per batch of news."""
        while True:
            frames = self.port.recv_frames()
            if not frames:
                return
            sent = self.nic.send_frames(frames)
            self.to_nic += sent
            self.lost += len(frames) - sent

    def close(self):
        self.quiet.restore()
        self.port.close()
        self.nic.close()

    def report(self):
        return (f"answered {self.answered}, to kernel {self.to_kernel}, to NIC {self.to_nic}, "
                f"lost {self.lost}")


def run_selectors(responder):
    """Wait on both sides with a selector until SIGINT or SIGTERM."""
    stop_r, stop_w = os.pipe()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: os.write(stop_w, b"x"))
    with selectors.DefaultSelector() as sel:
        sel.register(responder.nic, selectors.EVENT_READ, responder.from_nic)
        sel.register(responder.port, selectors.EVENT_READ, responder.from_kernel)
        sel.register(stop_r, selectors.EVENT_READ, None)
        print("ready", flush=True)
        while True:
            for key, _ in sel.select():
                if key.data is None:
                    return
                key.data()


def run_asyncio(responder):
    """The same with asyncio: a reader callback per side (Python 3.6's API too)."""
    loop = asyncio.new_event_loop()
    try:
        stopped = loop.create_future()
        loop.add_reader(responder.nic.fileno(), responder.from_nic)
        loop.add_reader(responder.port.fileno(), responder.from_kernel)
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
