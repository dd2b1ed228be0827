"""Benchmark (not run by CI): vhostpath against the kernel-direct limit, in ONE guest boot.

    sudo python3 tests/bench.py [--seconds 10]

Each setup carries iperf3 TCP traffic both ways between the kernel side
(1.1.1.1) and the outside host (1.1.1.2, namespace "outside"):
  - kernel direct: 1.1.1.1 placed on the NIC-side veth, no user-space hop (the limit),
    with the NIC's offloads off (the reference for vhostpath without offloads) and on
    (the reference for --lro);
  - vhostpath: 1.1.1.1 on tap0, vhostpath bridging veth0 <-> tap0 through vhost-net,
    without offloads, with --rx-cksum, with --lro.
Each runs with the outside veth's offloads off (a plain 1500-byte wire) and on
(veth's defaults).  Prints a markdown table with ratios to the matching kernel-direct
row; TCG speed varies between boots, so only ratios from one run compare.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT]

from tests import topo  # noqa: E402

RESULT = "/mnt/results/bench.md"


def iperf3(seconds, reverse):
    """Mb/s of one iperf3 TCP run from the kernel side to the outside (reverse: back)."""
    server = subprocess.Popen(["ip", "netns", "exec", topo.NS, "iperf3", "-s", "-1",
                               "--forceflush"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while "listening" not in (line := topo.readline(server.stdout, deadline) or "x"):
            if line == "x":
                raise RuntimeError("iperf3 server did not start")
        r = subprocess.run(["iperf3", "-c", topo.OUTSIDE_IP, "-t", str(seconds), "-J",
                            *(["-R"] if reverse else [])],
                           capture_output=True, text=True, timeout=seconds + 60)
        if r.returncode:
            raise RuntimeError(f"iperf3 failed: {r.stdout[-500:]} {r.stderr[-500:]}")
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        server.kill()
        server.wait()


def kernel_direct(nic_offloads):
    def start():
        if not nic_offloads:
            topo.sh("ethtool", "-K", "veth0", "tx", "off")
        topo.configure_tap("veth0")
    return start


def vhostpath(*args):
    def start():
        tool = topo.Tool("--iface", "veth0", "--queue-size", "1024", *args)
        topo.configure_tap("tap0")
        return tool
    return start


# (name, start, index of the reference row in this list or None for a reference)
SETUPS = [
    ("kernel direct, NIC tx offloads off", kernel_direct(False), None),
    ("vhostpath --no-lro --no-rx-cksum", vhostpath("--no-lro", "--no-rx-cksum"), 0),
    ("vhostpath --rx-cksum", vhostpath("--rx-cksum"), 0),
    ("kernel direct, NIC offloads on", kernel_direct(True), None),
    ("vhostpath --lro", vhostpath("--lro"), 3),
]


def in_guest(seconds):
    rows = []
    for offloads in (False, True):
        measured = []
        for name, start, ref in SETUPS:
            topo.make_outside(offloads=offloads)
            tool = start()
            try:
                if topo.ping(topo.OUTSIDE_IP) == 0:
                    raise RuntimeError(f"{name}: no connectivity")
                inbound = iperf3(seconds, reverse=True)      # outside -> kernel
                outbound = iperf3(seconds, reverse=False)    # kernel -> outside
            finally:
                if tool:
                    tool.stop()
                topo.remove_outside()
            measured.append((inbound, outbound))
            base = measured[ref] if ref is not None else (inbound, outbound)
            rows.append((name, "on" if offloads else "off", inbound, outbound,
                         inbound / base[0], outbound / base[1]))
    lines = ["| setup | outside offloads | outside->kernel Mb/s | kernel->outside Mb/s "
             "| ratio in | ratio out |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {o} | {i:.0f} | {u:.0f} | {ri:.2f}x | {ru:.2f}x |"
              for n, o, i, u, ri, ru in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    with open(RESULT, "w") as f:
        f.write(table)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.chdir(ROOT)
    if args.in_guest:
        return in_guest(args.seconds)
    from tests import guest
    rc, _, files = guest.run(f"{sys.executable} tests/bench.py --in-guest "
                             f"--seconds {args.seconds}", cwd=ROOT, echo=False)
    table = files.get("bench.md", b"").decode()
    print(f"{time.strftime('%Y-%m-%d')}, QEMU TCG, 2 vCPUs, Debian kernel "
          f"{os.path.basename(guest.find_kernel()[1])}\n\n{table}")
    return rc if table else 1


if __name__ == "__main__":
    sys.exit(main())
