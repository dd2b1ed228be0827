"""The naive Python bridge a user writes first: a benchmark peer, not part of vhostpath.

    python3 naive_bridge.py IFACE      # prints "ready TAPNAME", bridges until killed

A tap read()/write() and a raw packet socket, one packet per select() wakeup,
no virtio-net header (so veth's partial checksums and TSO frames break TCP).
"""
import fcntl
import os
import select
import socket
import struct
import sys

TUNSETIFF, IFF_TAP, IFF_NO_PI, PACKET_OUTGOING = 0x400454CA, 0x0002, 0x1000, 4

tap = os.open("/dev/net/tun", os.O_RDWR)
ifr = fcntl.ioctl(tap, TUNSETIFF, struct.pack("16sH22x", b"tap%d", IFF_TAP | IFF_NO_PI))
name = ifr[:16].rstrip(b"\0").decode()
nic = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
nic.bind((sys.argv[1], 0))
print("ready", name, flush=True)
while True:
    ready, _, _ = select.select([tap, nic], [], [])
    try:
        if tap in ready:
            nic.send(os.read(tap, 65536))
        if nic in ready:
            frame, addr = nic.recvfrom(65536)
            if addr[2] != PACKET_OUTGOING:
                os.write(tap, frame)
    except OSError:
        pass
