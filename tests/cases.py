"""Test cases shared by the host tier (tap backend) and the guest tier (vhost-net).

Mixins: a test module combines them with unittest.TestCase and sets BACKEND.
"""

import os
import signal
import subprocess
import sys
import time

from tests import topo

MB = 1 << 20


def vhost_threads_per_pair(backend, args):
    """vhost worker threads of one queue pair: one per vhost-net device, i.e. the tap's,
    and the NIC's unless --nic-backend socket."""
    if backend != "vhost-net":
        return 0
    nic = args[args.index("--nic-backend") + 1] if "--nic-backend" in args else "vhost-net"
    return 2 if nic == "vhost-net" else 1


class BridgeCase:
    """The command-line tool bridging veth0 (the NIC) and tap0, end to end."""

    BACKEND = "vhost-net"   # --backend
    ARGS = ()               # further tool options
    OFFLOADS = True         # the outside veth's checksum/TSO offloads
    GRO = False             # GRO on both veth ends
    LRO = False             # whether ARGS make the kernel hand over 64 KB segments

    @classmethod
    def setUpClass(cls):
        topo.make_outside(offloads=cls.OFFLOADS, gro=cls.GRO)
        cls.errors_before = (topo.checksum_errors(), topo.checksum_errors(ns=topo.NS))
        cls.tool = topo.Tool("--iface", "veth0", "--backend", cls.BACKEND, *cls.ARGS)
        topo.configure_tap("tap0")

    @classmethod
    def tearDownClass(cls):
        cls.tool.kill()
        topo.remove_outside()

    def test_1_tap_named_by_the_kernel(self):
        through = (r"through /dev/vhost-net, queue size \d+" if self.BACKEND == "vhost-net"
                   else r"through the tap backend \(read/write\)")
        self.assertRegex(self.tool.first_line, r"^tap0 created \(named by the kernel\), "
                         + through + r"(, \d+ queue pairs \([\w -]+\))?, bridging veth0 <-> tap0$")

    def test_2_ping_both_ways(self):
        self.assertEqual(topo.ping(topo.OUTSIDE_IP), 3)
        self.assertEqual(topo.ping(topo.KERNEL_IP, ns=topo.NS), 3)

    def test_3_tcp_outside_to_kernel(self):
        sent, received = topo.tcp_transfer("in", 20 * MB)
        self.assertEqual(sent, received)
        self.assertTrue(sent.startswith(f"{20 * MB} "))

    def test_4_tcp_kernel_to_outside(self):
        sent, received = topo.tcp_transfer("out", 20 * MB)
        self.assertEqual(sent, received)
        self.assertTrue(sent.startswith(f"{20 * MB} "))

    def test_5_no_checksum_errors_on_either_side(self):
        self.assertEqual(topo.checksum_errors(), self.errors_before[0])
        self.assertEqual(topo.checksum_errors(ns=topo.NS), self.errors_before[1])

    def test_6_statistics_show_the_traffic(self):
        rc, out, err = self.tool.stop(signal.SIGINT)
        self.assertEqual(rc, 0, err)
        ports = topo.report_counters(out)
        self.assertEqual(set(ports), {"veth0", "tap0"}, out)
        nic, tap = ports["veth0"], ports["tap0"]
        # Both transfers crossed the tool: 20 MB each way, plus headers.
        for counters, key in ((nic, "RX-bytes"), (nic, "TX-bytes"), (tap, "RX-bytes"),
                              (tap, "TX-bytes")):
            self.assertGreater(counters[key], 20 * MB, key)
        # Every frame is accounted for: delivered, or dropped where it was refused
        # (the tap backend's write() fails while the tap is still down).
        self.assertEqual(nic["TX-packets"] + nic["TX-dropped"], tap["RX-packets"])
        self.assertEqual(nic["RX-packets"], tap["TX-packets"] + tap["TX-dropped"])
        self.assertEqual(nic["TX-dropped"], 0)
        # Frames above the MTU: from the kernel only with LRO, from the NIC only
        # when the outside sends TSO super-frames.
        if self.LRO:
            self.assertGreater(nic["TX-over-MTU"], 0, out)
        else:
            self.assertEqual(nic["TX-over-MTU"], 0, out)
        if self.OFFLOADS:
            self.assertGreater(nic["RX-over-MTU"], 0, out)
        else:
            self.assertEqual(nic["RX-over-MTU"], 0, out)
        self.assertNotIn("tap0", topo.interfaces())


class VlanCase:
    """With BridgeCase, where the kernel has 802.1Q interfaces (8021q; the guest's has):
    tagged traffic crosses both ways.  Runs between BridgeCase's tests 5 and 6."""

    def test_5a_vlan_tags_cross_both_ways(self):
        # The kernel takes a tag off before any packet socket sees the frame; the
        # bridge must put it back, header offsets (GSO, partial checksums) moved too.
        topo.add_vlans()
        self.addCleanup(topo.remove_vlans)
        errors = (topo.checksum_errors(), topo.checksum_errors(ns=topo.NS))
        self.assertEqual(topo.ping(topo.VLAN_OUTSIDE_IP), 3)
        self.assertEqual(topo.ping(topo.VLAN_KERNEL_IP, ns=topo.NS), 3)
        for direction in ("in", "out"):
            sent, received = topo.tcp_transfer(direction, 4 * MB, kernel_ip=topo.VLAN_KERNEL_IP,
                                               outside_ip=topo.VLAN_OUTSIDE_IP)
            self.assertEqual(sent, received, direction)
            self.assertTrue(sent.startswith(f"{4 * MB} "), direction)
        self.assertEqual((topo.checksum_errors(), topo.checksum_errors(ns=topo.NS)), errors)


class ShutdownCase:
    """SIGINT and SIGTERM: report printed, tap gone, vhost threads gone, NIC restored."""

    BACKEND = "vhost-net"
    ARGS = ()

    def setUp(self):
        topo.make_outside()

    def tearDown(self):
        topo.remove_outside()

    def check_signal(self, sig):
        arp_ignore = "/proc/sys/net/ipv4/conf/veth0/arp_ignore"
        with open(arp_ignore) as f:
            original = f.read().strip()
        tool = topo.Tool("--iface", "veth0", "--backend", self.BACKEND, *self.ARGS)
        try:
            self.assertIn("tap0", topo.interfaces())
            self.assertEqual(len(topo.vhost_threads(tool.pid)),
                             vhost_threads_per_pair(self.BACKEND, self.ARGS))
            with open(arp_ignore) as f:
                self.assertEqual(f.read().strip(), "8")
            rc, out, err = tool.stop(sig)
        finally:
            tool.kill()
        self.assertEqual(rc, 0, err)
        self.assertIn("Forward statistics for port 0 (veth0)", out)
        self.assertIn("Forward statistics for port 1 (tap0)", out)
        self.assertNotIn("tap0", topo.interfaces())
        self.assertEqual(topo.vhost_threads(tool.pid), [])
        with open(arp_ignore) as f:
            self.assertEqual(f.read().strip(), original)

    def test_sigint(self):
        self.check_signal(signal.SIGINT)

    def test_sigterm(self):
        self.check_signal(signal.SIGTERM)


class DemoCase:
    """`vhostpath demo`: works, and leaves nothing behind, also when interrupted."""

    BACKEND_LINE = ""        # what the demo must say about the backend

    def leftovers(self, before):
        left = topo.interfaces() - before
        if os.path.exists("/run/netns/vhostpath-demo"):
            left.add("netns vhostpath-demo")
        return left

    def test_demo_succeeds_and_leaves_nothing(self):
        before = topo.interfaces()
        r = subprocess.run([sys.executable, topo.TOOL, "demo"], capture_output=True,
                           text=True, timeout=600)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn(self.BACKEND_LINE, r.stdout)
        self.assertIn("from the kernel side: 3/3 replies", r.stdout)
        self.assertIn("from the outside host: 3/3 replies", r.stdout)
        self.assertIn("sha256 matches", r.stdout)
        self.assertIn("Forward statistics for port 0 (vpdemo0)", r.stdout)
        self.assertEqual(self.leftovers(before), set())

    def check_interrupted(self, sig):
        before = topo.interfaces()
        proc = subprocess.Popen([sys.executable, topo.TOOL, "demo", "--bytes", str(64 << 20)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 300
            while "bridging" not in (line := topo.readline(proc.stdout, deadline) or "EOF"):
                self.assertNotEqual(line, "EOF", "demo ended before bridging")
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        self.assertEqual(proc.returncode, 1)
        self.assertIn("interrupted; everything created was removed", err.decode())
        self.assertEqual(self.leftovers(before), set())

    def test_demo_interrupted_by_sigint(self):
        self.check_interrupted(signal.SIGINT)

    def test_demo_interrupted_by_sigterm(self):
        self.check_interrupted(signal.SIGTERM)


class QueuesCase:
    """--queues N: N workers (and their vhost threads), flows spread, integrity, clean stop."""

    BACKEND = "vhost-net"
    ARGS = ()
    QUEUES = 2

    @classmethod
    def setUpClass(cls):
        topo.make_outside(offloads=False)
        cls.tool = topo.Tool("--iface", "veth0", "--backend", cls.BACKEND,
                             "--queues", str(cls.QUEUES), *cls.ARGS)
        topo.configure_tap("tap0")

    @classmethod
    def tearDownClass(cls):
        cls.tool.kill()
        topo.remove_outside()

    def test_1_one_worker_tap_queue_and_vhost_threads_per_pair(self):
        self.assertIn(f"{self.QUEUES} queue pairs", self.tool.first_line)
        workers = topo.children(self.tool.pid)
        self.assertEqual(len(workers), self.QUEUES)
        self.assertEqual(topo.tap_queues("tap0"), self.QUEUES)
        threads = [len(topo.vhost_threads(pid)) for pid in workers]
        self.assertEqual(threads, [vhost_threads_per_pair(self.BACKEND, self.ARGS)] * self.QUEUES)
        self.assertEqual(topo.vhost_threads(self.tool.pid), [])

    def test_2_parallel_flows_both_ways(self):
        self.assertGreater(topo.iperf3(8, 3), 0)
        self.assertGreater(topo.iperf3(8, 3, reverse=True), 0)

    def test_3_tcp_integrity_both_ways(self):
        for direction in ("in", "out"):
            sent, received = topo.tcp_transfer(direction, 20 * MB)
            self.assertEqual(sent, received, direction)
            self.assertTrue(sent.startswith(f"{20 * MB} "))

    def test_4_stop_reports_per_queue_and_leaves_nothing(self):
        workers = topo.children(self.tool.pid)
        rc, out, err = self.tool.stop(signal.SIGINT)
        self.assertEqual(rc, 0, err)
        per_queue = topo.queue_counters(out)
        self.assertEqual(len(per_queue), self.QUEUES, out)
        # 8 parallel flows hash onto at least 2 queues, in each direction.
        self.assertGreaterEqual(sum(rx > 100 for rx, _ in per_queue), 2, out)
        self.assertGreaterEqual(sum(tx > 100 for _, tx in per_queue), 2, out)
        totals = topo.report_counters(out)
        self.assertEqual(totals["veth0"]["RX-packets"], sum(rx for rx, _ in per_queue))
        self.assertEqual(totals["veth0"]["TX-packets"], sum(tx for _, tx in per_queue))
        self.assertNotIn("tap0", topo.interfaces())
        self.assertEqual([pid for pid in workers if os.path.exists(f"/proc/{pid}")], [])
        for pid in workers:
            self.assertEqual(topo.vhost_threads(pid), [])


class QueuesShutdownCase:
    """Stopping the parent of --queues 2 by SIGTERM or SIGKILL leaves no worker and no tap."""

    BACKEND = "vhost-net"

    def setUp(self):
        topo.make_outside()
        with open("/proc/sys/net/ipv4/conf/veth0/arp_ignore") as f:
            self.arp_ignore = f.read().strip()

    def tearDown(self):
        topo.remove_outside()

    def check(self, sig):
        tool = topo.Tool("--iface", "veth0", "--backend", self.BACKEND, "--queues", "2")
        try:
            workers = topo.children(tool.pid)
            self.assertEqual(len(workers), 2)
            tool.proc.send_signal(sig)
            tool.proc.wait(timeout=60)
        finally:
            tool.kill()
        topo.wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in workers), 60,
                        "the workers to exit")
        topo.wait_until(lambda: "tap0" not in topo.interfaces(), 60, "tap0 to disappear")
        for pid in workers:
            self.assertEqual(topo.vhost_threads(pid), [])
        with open("/proc/sys/net/ipv4/conf/veth0/arp_ignore") as f:
            self.assertEqual(f.read().strip(), self.arp_ignore)
        return tool.proc.returncode

    def test_sigterm(self):
        self.assertEqual(self.check(signal.SIGTERM), 0)

    def test_sigkill_of_the_parent(self):
        self.assertEqual(self.check(signal.SIGKILL), -signal.SIGKILL)
