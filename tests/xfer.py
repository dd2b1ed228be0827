"""TCP transfer with a sha256 on each end, for the end-to-end tests and benchmarks; and
UDP datagrams sent as one UDP GSO super-frame (UDP_SEGMENT, Linux 4.18).

    python3 xfer.py recv PORT              # prints "ready", then "<bytes> <sha256>" at EOF
    python3 xfer.py send HOST PORT BYTES   # sends BYTES random bytes, prints "<bytes> <sha256>"
    python3 xfer.py udp-recv PORT COUNT    # "ready", then "<datagrams> <sha256>" of COUNT
    python3 xfer.py udp-send HOST PORT COUNT SIZE   # COUNT datagrams of SIZE in one send
"""
import hashlib
import os
import socket
import sys


def recv(port):
    with socket.socket() as srv:                # socket.create_server needs Python 3.8
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", int(port)))
        srv.listen()
        print("ready", flush=True)
        srv.settimeout(120)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(120)
            digest, total = hashlib.sha256(), 0
            buf = bytearray(1 << 16)
            for n in iter(lambda: conn.recv_into(buf), 0):
                digest.update(memoryview(buf)[:n])
                total += n
    print(total, digest.hexdigest(), flush=True)


def send(host, port, nbytes):
    nbytes = int(nbytes)
    digest, total = hashlib.sha256(), 0
    with socket.create_connection((host, int(port)), timeout=120) as conn:
        while total < nbytes:
            chunk = os.urandom(min(1 << 20, nbytes - total))
            conn.sendall(chunk)
            digest.update(chunk)
            total += len(chunk)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)                      # wait for the receiver to close: all data read
    print(total, digest.hexdigest(), flush=True)


UDP_SEGMENT = 103                         # linux/udp.h, at level SOL_UDP (IPPROTO_UDP)


def udp_recv(port, count):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", int(port)))
        print("ready", flush=True)
        sock.settimeout(30)
        digest, got = hashlib.sha256(), 0
        while got < int(count):
            digest.update(sock.recv(65536))
            got += 1
    print(got, digest.hexdigest(), flush=True)


def udp_send(host, port, count, size):
    data = os.urandom(int(count) * int(size))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, int(size))
        sock.sendto(data, (host, int(port)))
    print(count, hashlib.sha256(data).hexdigest(), flush=True)


if __name__ == "__main__":
    {"recv": recv, "send": send, "udp-recv": udp_recv,
     "udp-send": udp_send}[sys.argv[1]](*sys.argv[2:])
