"""Benchmark (not run by CI): vhostpath against the kernel-direct limit, in ONE guest boot.

    sudo python3 tests/bench.py [--suite offloads|peers|latency|queues|profile|memory]
                                [--seconds 10]
                                [--kernel 6.1|6.12]

"peers" is the reference: kernel direct, DPDK testpmd, a naive Python bridge and
every vhostpath mode (both NIC I/O modes), TCP, 64-byte rates, RTT and CPU; "latency"
is peers without TCP and 64-byte rates (RTT, wakeups, TCP RR, idle CPU), for iterating.

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
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT]

import vhostpath as vp  # noqa: E402
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


def offloads_suite(seconds, only=None):
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


def queues_suite(seconds, only=None):
    """--queues 1, 2 and 4 with 8 parallel flows (iperf3 -P 8), outside offloads off."""
    rows, base = [], None
    for n in (1, 2, 4):
        inbound, outbound = measure(f"queues {n}", vhostpath("--queues", str(n)), False,
                                    seconds, parallel=8)
        base = base or (inbound, outbound)
        rows.append((f"vhostpath --queues {n}, iperf3 -P 8", "off", inbound, outbound,
                     inbound / base[0], outbound / base[1]))
    return rows


# -- peers: issue "benchmark against the peers" ---------------------------------------

class Running:
    """A forwarding setup in place: the kernel-side interface and the forwarding pid."""

    def __init__(self, dev, pid=None, stop=None):
        self.dev, self.pid, self._stop = dev, pid, stop

    def stop(self):
        if self._stop:
            self._stop()


def _quiet_veth0():
    with open("/proc/sys/net/ipv4/conf/veth0/arp_ignore", "w") as f:
        f.write("8")           # the NIC must not answer ARP for the tap's address


def _wait_ping(timeout):
    deadline = time.monotonic() + timeout
    while topo.ping(topo.OUTSIDE_IP, count=1) == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("no connectivity through the forwarder")


def peer_kernel_direct():
    topo.configure_tap("veth0")
    return Running("veth0")


def peer_testpmd():
    with open("/proc/sys/vm/nr_hugepages", "w") as f:
        f.write("512")
    os.makedirs("/dev/hugepages", exist_ok=True)
    topo.sh("mount", "-t", "hugetlbfs", "nodev", "/dev/hugepages", check=False)
    proc = subprocess.Popen(
        ["dpdk-testpmd", "-l", "0-1", "-n", "4",
         "--vdev=virtio_user0,path=/dev/vhost-net,queue_size=1024",
         "--vdev=net_af_packet0,iface=veth0", "--", "-a", "--forward-mode=io",
         "--rxd=1024", "--txd=1024"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop():
        proc.kill()
        proc.wait()
        # A killed testpmd leaves its hugepage files behind, holding the pages.
        for name in os.listdir("/dev/hugepages"):
            os.unlink(os.path.join("/dev/hugepages", name))
    try:
        topo.wait_until(lambda: "tap0" in topo.interfaces() or proc.poll() is not None, 600,
                        "testpmd to create tap0")
        if proc.poll() is not None:
            raise RuntimeError(f"testpmd exited with {proc.returncode}")
        _quiet_veth0()
        topo.configure_tap("tap0")
        _wait_ping(120)
    except BaseException:
        stop()
        raise
    return Running("tap0", proc.pid, stop)


def peer_naive():
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "naive_bridge.py"), "veth0"],
                            stdout=subprocess.PIPE)

    def stop():
        proc.kill()
        proc.wait()
    line = topo.readline(proc.stdout, time.monotonic() + 60) or ""
    if not line.startswith("ready"):
        stop()
        raise RuntimeError("naive bridge did not start")
    _quiet_veth0()
    topo.configure_tap(line.split()[1])
    _wait_ping(60)
    return Running(line.split()[1], proc.pid, stop)


def peer_vhostpath(*args, tool=topo.TOOL):
    def start():
        tool_run = topo.Tool("--iface", "veth0", "--queue-size", "1024", *args, tool=tool)
        topo.configure_tap("tap0")
        return Running("tap0", tool_run.pid, tool_run.stop)
    return start


PEERS = [
    ("kernel direct", peer_kernel_direct, True),
    ("DPDK testpmd io (virtio_user + af_packet)", peer_testpmd, False),
    ("naive Python bridge (tap read/write)", peer_naive, False),
    ("vhostpath --no-lro --no-rx-cksum", peer_vhostpath("--no-lro", "--no-rx-cksum"), True),
    ("vhostpath --rx-cksum --no-lro", peer_vhostpath("--rx-cksum", "--no-lro"), True),
    ("vhostpath (defaults: --lro)", peer_vhostpath(), True),
    ("vhostpath --busy-poll 1000", peer_vhostpath("--busy-poll", "1000"), True),
    # Longer than the pings' 10 ms gaps: the process never sleeps while they run.
    ("vhostpath --busy-poll 20000", peer_vhostpath("--busy-poll", "20000"), True),
    # The vhost workers spinning as long too: what they cost on a small host.
    ("vhostpath --busy-poll 20000 --vhost-busy-poll 20000",
     peer_vhostpath("--busy-poll", "20000", "--vhost-busy-poll", "20000"), True),
    ("vhostpath --nic-io socket", peer_vhostpath("--nic-io", "socket"), True),
    ("vhostpath --tap-io read-write", peer_vhostpath("--tap-io", "read-write"), True),
]   # (name, start, survives the outside's offloads)


def pktgen_kpps(inbound, dev, count=200000):
    """64-byte UDP from pktgen; kpps that arrive at the other end."""
    recv_dev, recv_ns = (dev, None) if inbound else ("veth1", topo.NS)
    before = topo.counter(recv_dev, "rx_packets", recv_ns)
    elapsed = topo.pktgen(inbound, dev, count)
    last = -1
    now = topo.counter(recv_dev, "rx_packets", recv_ns)
    while now != last:                      # until the tail has drained
        last = now
        time.sleep(0.5)
        now = topo.counter(recv_dev, "rx_packets", recv_ns)
    return (last - before) / elapsed / 1000


def rtt_ms(count=200):
    """(mean, p99) of ``count`` pings 10 ms apart, in ms."""
    out = topo.sh("ping", "-c", str(count), "-i", "0.01", "-W", "2", topo.OUTSIDE_IP,
                  check=False, timeout=120)
    times = sorted(float(t) for t in __import__("re").findall(r"time=([\d.]+) ms", out))
    if not times:
        return float("nan"), float("nan")
    return sum(times) / len(times), times[min(len(times) - 1, len(times) * 99 // 100)]


def tcp_rr(seconds):
    """TCP request/response: a 1-byte request from the kernel side, a 1-byte answer from
    the outside, one connection, for ``seconds``; transactions per second."""
    import socket
    import threading
    with vp.socket_in_netns(topo.NS, socket.AF_INET, socket.SOCK_STREAM) as srv, \
            socket.socket() as cli:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", 5003))
        srv.listen(1)
        cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cli.settimeout(10)
        cli.connect((topo.OUTSIDE_IP, 5003))
        conn = srv.accept()[0]
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def answer():
            with conn:
                for _ in iter(lambda: conn.recv(1), b""):
                    conn.sendall(b"a")
        echo = threading.Thread(target=answer, daemon=True)
        echo.start()
        done, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            cli.sendall(b"q")
            if not cli.recv(1):
                break
            done += 1
        cli.shutdown(socket.SHUT_WR)
        echo.join(10)
    return done / seconds


def peers_suite(seconds, only=None, rounds=1, latency_only=False):
    """Every peer, ``rounds`` times over (interleaved, so drift hits all alike); each
    figure is the median of its rounds."""
    rows = [row for _ in range(rounds) for row in _peers_round(seconds, only, latency_only)]
    merged = {}
    for row in rows:
        merged.setdefault((row["name"], row["offloads"]), []).append(row)
    return [_median_row(group) for group in merged.values()]


def _median_row(group):
    """One row from the rounds of a setup: the median of each figure over the rounds
    that worked (the name says how many failed); failed if none did."""
    good = [r for r in group if "error" not in r]
    if not good:
        return group[0]
    row = dict(good[0])
    for key, value in row.items():
        if isinstance(value, float):
            values = sorted(r[key] for r in good)
            row[key] = values[len(values) // 2]
    if len(good) < len(group):
        row["name"] += f" ({len(group) - len(good)} of {len(group)} rounds failed)"
    return row


def latency_suite(seconds, only=None, rounds=1):
    """peers, the latency columns only (RTT, wakeups, TCP RR, idle CPU): for iterating."""
    return peers_suite(seconds, only, rounds, latency_only=True)


def _peers_round(seconds, only, latency_only=False):
    rows = []
    for offloads in (False,) if latency_only else (False, True):
        for name, start, survives in PEERS:
            if offloads and not survives or only and not any(o in name for o in only):
                continue
            topo.make_outside(offloads=offloads)
            run = None
            try:
                run = start()
                row = {"name": name, "offloads": offloads}
                if not latency_only:
                    cpu0 = topo.cpu_seconds(run.pid)
                    row["in"] = topo.iperf3(1, seconds, reverse=True)
                    row["out"] = topo.iperf3(1, seconds)
                    row["cpu_gb"] = (topo.cpu_seconds(run.pid) - cpu0) / (
                        (row["in"] + row["out"]) * seconds / 8e3)
                if not offloads and not latency_only:
                    row["pps_in"] = pktgen_kpps(True, run.dev)
                    row["pps_out"] = pktgen_kpps(False, run.dev)
                if not offloads:
                    woken = topo.wakeups(run.pid)
                    row["rtt"], row["rtt_p99"] = rtt_ms()
                    if run.pid is not None:         # kernel direct: no process of its own
                        row["wakeups"] = (topo.wakeups(run.pid) - woken) / 200
                    row["rr"] = tcp_rr(5)
                    cpu0 = topo.cpu_seconds(run.pid)
                    time.sleep(10)                  # idle: no traffic for 10 s
                    row["idle"] = (topo.cpu_seconds(run.pid) - cpu0) / 10 * 100
                rows.append(row)
            except Exception as e:                 # a peer that fails is reported, not fatal
                rows.append({"name": name, "offloads": offloads, "error": str(e)[:80]})
            finally:
                if run:
                    run.stop()
                topo.remove_outside()
    return rows


def peers_table(rows):
    def ratio(row, key, ref):
        if key not in row:
            return "-"
        if not ref or not ref.get(key):             # no kernel direct row to compare with
            return f"{row[key]:.0f}"
        return f"{row[key]:.0f} ({row[key] / ref[key]:.2f}x)"
    out = []
    for offloads in sorted({r["offloads"] for r in rows}):
        ref = next((r for r in rows if r["offloads"] == offloads and "error" not in r
                    and r["name"] == "kernel direct"), None)
        out.append(f"\nOutside veth offloads {'on (veth defaults)' if offloads else 'off'}:\n")
        out.append("| setup | TCP in Mb/s | TCP out Mb/s | 64 B in kpps | 64 B out kpps "
                   "| ping RTT mean / p99 ms | wakeups per ping | TCP RR /s | CPU s/GB "
                   "| idle CPU % |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in (r for r in rows if r["offloads"] == offloads):
            if "error" in r:
                out.append(f"| {r['name']} | failed: {r['error']} | | | | | | | | |")
                continue
            direct = r["name"] == "kernel direct"
            out.append(" | ".join([
                f"| {r['name']}", ratio(r, "in", ref), ratio(r, "out", ref),
                ratio(r, "pps_in", ref), ratio(r, "pps_out", ref),
                f"{r['rtt']:.2f} / {r['rtt_p99']:.2f}" if "rtt" in r else "-",
                f"{r['wakeups']:.1f}" if "wakeups" in r else "-",
                f"{r['rr']:.0f}" if "rr" in r else "-",
                "-" if direct or "cpu_gb" not in r else f"{r['cpu_gb']:.1f}",
                "-" if direct or "idle" not in r else f"{r['idle']:.1f}"]) + " |")
    return "\n".join(out) + "\n"


def profile_suite(seconds, only=None):
    """vhostpath (defaults) under cProfile during 200 pings, then during iperf3 each way,
    outside offloads off; the top functions by own time, as the report."""
    import pstats
    import io
    out = io.StringIO()
    for label, args in (("pings", ()), ("defaults", ()),
                        ("--no-lro --no-rx-cksum", ("--no-lro", "--no-rx-cksum"))):
        prof = "/tmp/vhostpath.prof"
        topo.make_outside(offloads=False)
        proc = subprocess.Popen([sys.executable, "-m", "cProfile", "-o", prof, topo.TOOL,
                                 "--iface", "veth0", "--queue-size", "1024", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            line = topo.readline(proc.stdout, time.monotonic() + 120) or ""
            if "created" not in line:
                raise RuntimeError(f"profiled vhostpath did not start: {line!r}")
            topo.configure_tap("tap0")
            if label == "pings":            # where a round trip's time goes in Python
                topo.ping(topo.OUTSIDE_IP)
                result = "RTT mean %.2f / p99 %.2f ms over 200 pings" % rtt_ms()
            else:
                result = "%.0f Mb/s in, %.0f Mb/s out" % (topo.iperf3(1, seconds, reverse=True),
                                                          topo.iperf3(1, seconds))
        finally:
            proc.send_signal(2)
            proc.communicate(timeout=120)
            topo.remove_outside()
        stats = pstats.Stats(prof, stream=out)
        out.write(f"\n### vhostpath {label}: {result} under cProfile\n\n```\n")
        stats.sort_stats("tottime").print_stats(18)
        out.write("```\n")
    return out.getvalue()


def memory_suite(seconds, only=None):
    """Address space and resident memory of one queue pair (the tool's process) at
    queue sizes 256 and 1024, idle after start and after 20 MB each way with LRO
    super-frames from the outside; the first -v line says the buffer layout."""
    def status_kb(pid, key):
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    out = ["| setup | queue size | virtual MB | resident MB idle | resident MB after 40 MB |",
           "|---|---|---|---|---|"]
    for args in ((), ("--nic-io", "socket")):
        for size in ("256", "1024"):
            topo.make_outside(offloads=True)
            tool = topo.Tool("--iface", "veth0", "--queue-size", size, "-v",
                             "--address", f"{topo.KERNEL_IP}/24", *args)
            try:
                idle = status_kb(tool.pid, "VmRSS")
                for direction in ("in", "out"):
                    topo.tcp_transfer(direction, 20 << 20)
                out.append(f"| vhostpath {' '.join(args) or '(defaults)'} | {size} | "
                           f"{status_kb(tool.pid, 'VmSize') / 1024:.0f} | {idle / 1024:.0f} | "
                           f"{status_kb(tool.pid, 'VmRSS') / 1024:.0f} |")
                _, _, err = tool.stop()
            finally:
                tool.kill()
                topo.remove_outside()
            out += [f"<!-- {line} -->" for line in err.splitlines() if "NIC side" in line]
    return "\n".join(out) + "\n"


SUITES = {"offloads": (offloads_suite, 2), "queues": (queues_suite, 4),
          "peers": (peers_suite, 2), "latency": (latency_suite, 2), "profile": (profile_suite, 2),
          "memory": (memory_suite, 2)}                      # (run, vCPUs)


def in_guest(suite, seconds, only=None, rounds=1, baselines=()):
    for baseline in baselines:      # other vhostpath.py files (commits before) beside this one
        PEERS.append((f"vhostpath (defaults) of {baseline}", peer_vhostpath(tool=baseline),
                      True))
        PEERS.append((f"vhostpath --busy-poll 20000 of {baseline}",
                      peer_vhostpath("--busy-poll", "20000", tool=baseline), True))
    from tests import guest
    with guest.hold_netstamp_key():
        rows = SUITES[suite][0](seconds, only,
                                **({"rounds": rounds} if suite in ("peers", "latency") else {}))
    if suite in ("peers", "latency", "profile", "memory"):
        table = peers_table(rows) if suite in ("peers", "latency") else rows
        print(table)
        with open(RESULT, "w") as f:
            f.write(table)
        return 0
    lines = ["| setup | outside offloads | outside->kernel Mb/s | kernel->outside Mb/s "
             "| ratio in | ratio out |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {o} | {i:.0f} | {u:.0f} | {ri:.2f}x | {ru:.2f}x |"
              for n, o, i, u, ri, ru in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    with open(RESULT, "w") as f:
        f.write(table)
    return 0


DPDK_PACKAGES = ["dpdk", "dpdk-dev", "librte-net-virtio23", "librte-net-af-packet23",
                 "librte-mempool-ring23"]


def ensure_dpdk():
    """Install testpmd and its PMDs (Debian 12); on failure say why: its row then fails."""
    if os.path.exists("/usr/bin/dpdk-testpmd"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-qq", *DPDK_PACKAGES], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        print(f"bench: DPDK packages could not be installed, testpmd is skipped: "
              f"{r.stderr.strip()[-300:]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="offloads",
                   help="offloads: against kernel direct (2 vCPUs); queues: --queues 1/2/4 "
                        "with 8 flows, ratios to 1 queue (4 vCPUs)")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--only", help="peers: comma-separated parts of setup names to run "
                                   "(for iterating; a report compares one full run)")
    p.add_argument("--rounds", type=int, default=1,
                   help="peers: measure every setup this many times, interleaved, and "
                        "report medians (default %(default)s)")
    p.add_argument("--baseline", metavar="FILE", action="append", default=[],
                   help="peers: also run this vhostpath.py with its defaults and with "
                        "--busy-poll 20000 (e.g. a copy of the commit before), for a "
                        "before/after in one boot; repeatable")
    p.add_argument("--kernel", choices=("6.1", "6.12"), default="6.1",
                   help="the guest's Debian kernel series (default %(default)s)")
    p.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.chdir(ROOT)
    only = args.only.split(",") if args.only else None
    if args.in_guest:
        return in_guest(args.suite, args.seconds, only, args.rounds, args.baseline)
    from tests import guest
    if args.suite in ("peers", "latency"):
        ensure_dpdk()
    cpus = SUITES[args.suite][1]
    rc, _, files = guest.run(f"{sys.executable} tests/bench.py --in-guest --suite {args.suite} "
                             f"--seconds {args.seconds} --rounds {args.rounds}"
                             + (f" --only '{args.only}'" if args.only else "")
                             + "".join(f" --baseline {os.path.abspath(b)}"
                                       for b in args.baseline),
                             cwd=ROOT, echo=False, cpus=cpus, kernel=args.kernel)
    table = files.get("bench.md", b"").decode()
    rounds = f", medians of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"{time.strftime('%Y-%m-%d')}, QEMU TCG, {cpus} vCPUs, Debian kernel "
          f"{os.path.basename(guest.find_kernel(args.kernel)[1])}{rounds}\n\n{table}")
    return rc if table else 1


if __name__ == "__main__":
    sys.exit(main())
