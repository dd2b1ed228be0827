"""Benchmark (not run by CI): vhostpath against the kernel-direct limit, in ONE guest boot.

    sudo python3 tests/bench.py [--suite offloads|queues] [--seconds 10]

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
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT]

from tests import topo  # noqa: E402

RESULT = "/mnt/results/bench.md"


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


def measure(name, start, offloads, seconds, parallel=1):
    """(outside->kernel, kernel->outside) Mb/s for one setup, on a fresh topology."""
    topo.make_outside(offloads=offloads)
    tool = start()
    try:
        if topo.ping(topo.OUTSIDE_IP) == 0:
            raise RuntimeError(f"{name}: no connectivity")
        return (topo.iperf3(parallel, seconds, reverse=True),
                topo.iperf3(parallel, seconds, reverse=False))
    finally:
        if tool:
            tool.stop()
        topo.remove_outside()


def offloads_suite(seconds):
    rows = []
    for offloads in (False, True):
        measured = []
        for name, start, ref in SETUPS:
            measured.append(measure(name, start, offloads, seconds))
            inbound, outbound = measured[-1]
            base = measured[ref] if ref is not None else measured[-1]
            rows.append((name, "on" if offloads else "off", inbound, outbound,
                         inbound / base[0], outbound / base[1]))
    return rows


def queues_suite(seconds):
    """--queues 1, 2 and 4 with 8 parallel flows (iperf3 -P 8), outside offloads off."""
    rows, base = [], None
    for n in (1, 2, 4):
        inbound, outbound = measure(f"queues {n}", vhostpath("--queues", str(n)), False,
                                    seconds, parallel=8)
        base = base or (inbound, outbound)
        rows.append((f"vhostpath --queues {n}, iperf3 -P 8", "off", inbound, outbound,
                     inbound / base[0], outbound / base[1]))
    return rows


SUITES = {"offloads": (offloads_suite, 2), "queues": (queues_suite, 4)}   # (run, vCPUs)


def in_guest(suite, seconds):
    rows = SUITES[suite][0](seconds)
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
    p.add_argument("--suite", choices=sorted(SUITES), default="offloads",
                   help="offloads: against kernel direct (2 vCPUs); queues: --queues 1/2/4 "
                        "with 8 flows, ratios to 1 queue (4 vCPUs)")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.chdir(ROOT)
    if args.in_guest:
        return in_guest(args.suite, args.seconds)
    from tests import guest
    cpus = SUITES[args.suite][1]
    rc, _, files = guest.run(f"{sys.executable} tests/bench.py --in-guest --suite {args.suite} "
                             f"--seconds {args.seconds}", cwd=ROOT, echo=False, cpus=cpus)
    table = files.get("bench.md", b"").decode()
    print(f"{time.strftime('%Y-%m-%d')}, QEMU TCG, {cpus} vCPUs, Debian kernel "
          f"{os.path.basename(guest.find_kernel()[1])}\n\n{table}")
    return rc if table else 1


if __name__ == "__main__":
    sys.exit(main())
