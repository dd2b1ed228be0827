"""Test cases shared by the host tier (--tap-io read-write) and the guest tier (vhost-net).

Mixins: a test module combines them with unittest.TestCase and sets TAP_IO.
Every test builds what it needs (OutsideCase: the outside host) and removes it,
so tests do not depend on their order.
"""

import contextlib
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import vhostpath as vp
from tests import topo

MB = 1 << 20


def vhost_threads_per_pair(tap_io, args):
    """vhost worker threads of one queue pair: one per vhost-net device, i.e. the tap's,
    and the NIC's unless --nic-io socket."""
    if tap_io != "vhost-net":
        return 0
    nic = args[args.index("--nic-io") + 1] if "--nic-io" in args else "vhost-net"
    return 2 if nic == "vhost-net" else 1


def through(tap_io):
    """What the tool's first line says of ``tap_io``, as a regular expression."""
    return (r"through /dev/vhost-net, queue size \d+" if tap_io == "vhost-net"
            else r"through read\(\)/write\(\) on the tap")


def check_closed_port(test, port):
    """A closed port's frame methods and fds raise ValueError, as a closed file's do,
    and a second close() does nothing."""
    for call in (lambda: port.send_frames([bytes(60)]), lambda: port.tx_burst([bytes(60)]),
                 port.recv_frames, port.rx_burst, port.fileno, port.tx_fileno):
        with test.assertRaisesRegex(ValueError, "the port is closed"):
            call()
    port.close()


class OutsideCase:
    """The one outside-host fixture: veth0 (the NIC) and the outside namespace behind
    it, made for each test and removed after it."""

    OFFLOADS = True         # the outside veth's checksum/TSO offloads
    GRO = False             # GRO on both veth ends

    def setUp(self):
        super().setUp()
        topo.make_outside(offloads=self.OFFLOADS, gro=self.GRO)
        self.addCleanup(topo.remove_outside)


class BridgeCase(OutsideCase):
    """The command-line tool bridging veth0 (the NIC) and tap0, end to end; each test
    starts its own tool."""

    TAP_IO = "vhost-net"    # --tap-io
    ARGS = ()               # further tool options
    LRO = False             # whether ARGS make the kernel hand over 64 KB segments
    VLANS = False           # tagged traffic too (needs 8021q, which the guest has)

    def setUp(self):
        super().setUp()
        self.errors_before = (topo.checksum_errors(), topo.checksum_errors(ns=topo.NS))
        # --address brings tap0 up with the kernel side's address: one command.
        self.tool = topo.Tool("--iface", "veth0", "--tap-io", self.TAP_IO,
                              "--address", f"{topo.KERNEL_IP}/24", *self.ARGS)
        self.addCleanup(self.tool.kill)

    def test_end_to_end(self):
        """Named tap0 by the kernel; ping both ways; 20 MB sha256-checked TCP each way;
        with VLANS, tagged traffic both ways too; no checksum error on either side;
        statistics that account for every frame; tap0 gone after SIGINT."""
        self.assertRegex(self.tool.first_line, r"^tap0 created \(named by the kernel\), "
                         + through(self.TAP_IO)
                         + r"(, \d+ queue pairs \([\w -]+\))?, bridging veth0 <-> tap0$")
        self.assertEqual(topo.ping(topo.OUTSIDE_IP), 3)
        self.assertEqual(topo.ping(topo.KERNEL_IP, ns=topo.NS), 3)
        for direction in ("in", "out"):
            sent, received = topo.tcp_transfer(direction, 20 * MB)
            self.assertEqual(sent, received, direction)
            self.assertTrue(sent.startswith(f"{20 * MB} "), direction)
        if self.VLANS:
            self.check_vlan_tags_cross_both_ways()
        self.assertEqual(topo.checksum_errors(), self.errors_before[0])
        self.assertEqual(topo.checksum_errors(ns=topo.NS), self.errors_before[1])
        rc, out, err = self.tool.stop(signal.SIGINT)
        self.assertEqual(rc, 0, err)
        self.check_statistics(out)
        self.assertNotIn("tap0", topo.interfaces())

    def check_statistics(self, out):
        ports = topo.report_counters(out)
        self.assertEqual(set(ports), {"veth0", "tap0"}, out)
        nic, tap = ports["veth0"], ports["tap0"]
        # Both transfers crossed the tool: 20 MB each way, plus headers.
        for counters, key in ((nic, "RX-bytes"), (nic, "TX-bytes"), (tap, "RX-bytes"),
                              (tap, "TX-bytes")):
            self.assertGreater(counters[key], 20 * MB, key)
        # Every frame is accounted for: delivered, or dropped where it was refused
        # (read-write tap I/O: write() fails while the tap is still down).
        self.assertEqual(nic["TX-packets"] + nic["TX-dropped"], tap["RX-packets"])
        self.assertEqual(nic["RX-packets"], tap["TX-packets"] + tap["TX-dropped"])
        self.assertEqual(nic["TX-dropped"], 0)
        # VhostBridge: a ping's frames find their ring idle and go straight to the
        # tap or the NIC socket (DIRECT_BATCH), bulk traffic through vhost.
        if vhost_threads_per_pair(self.TAP_IO, self.ARGS) == 2:
            for counters in (nic, tap):
                self.assertGreaterEqual(counters.get("TX-direct", 0), 3, out)
                self.assertLess(counters["TX-direct"], counters["TX-packets"], out)
            # The tap read from here while idle; the transfers out of the kernel
            # bound its RX vring to its vhost worker (TAP_BIND_HOLD).
            self.assertGreaterEqual(tap.get("RX-direct", 0), 3, out)
            self.assertLess(tap["RX-direct"], tap["RX-packets"], out)
            self.assertGreater(tap.get("RX-binds", 0), 0, out)
        else:
            self.assertNotIn("TX-direct", out)
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

    def check_vlan_tags_cross_both_ways(self):
        # The kernel takes a tag off before any packet socket sees the frame; the
        # bridge must put it back, header offsets (GSO, partial checksums) moved too.
        topo.add_vlans()
        self.addCleanup(topo.remove_vlans)
        self.assertEqual(topo.ping(topo.VLAN_OUTSIDE_IP), 3)
        self.assertEqual(topo.ping(topo.VLAN_KERNEL_IP, ns=topo.NS), 3)
        for direction in ("in", "out"):
            sent, received = topo.tcp_transfer(direction, 4 * MB, kernel_ip=topo.VLAN_KERNEL_IP,
                                               outside_ip=topo.VLAN_OUTSIDE_IP)
            self.assertEqual(sent, received, f"VLAN {direction}")
            self.assertTrue(sent.startswith(f"{4 * MB} "), f"VLAN {direction}")


class ShutdownCase(OutsideCase):
    """SIGINT and SIGTERM: report printed, tap gone, vhost threads gone, NIC restored."""

    TAP_IO = "vhost-net"
    ARGS = ()

    def check_signal(self, sig):
        original = topo.nic_settings()
        tool = topo.Tool("--iface", "veth0", "--tap-io", self.TAP_IO, *self.ARGS)
        try:
            self.assertIn("tap0", topo.interfaces())
            self.assertEqual(len(topo.vhost_threads(tool.pid)),
                             vhost_threads_per_pair(self.TAP_IO, self.ARGS))
            self.assertEqual(topo.nic_settings(), topo.QUIET)
            rc, out, err = tool.stop(sig)
        finally:
            tool.kill()
        self.assertEqual(rc, 0, err)
        self.assertIn("Forward statistics for port 0 (veth0)", out)
        self.assertIn("Forward statistics for port 1 (tap0)", out)
        self.assertNotIn("tap0", topo.interfaces())
        self.assertEqual(topo.vhost_threads(tool.pid), [])
        self.assertEqual(topo.nic_settings(), original)

    def test_sigint(self):
        self.check_signal(signal.SIGINT)

    def test_sigterm(self):
        self.check_signal(signal.SIGTERM)

    def test_sighup(self):
        """The terminal or the ssh session gone: the same clean stop."""
        self.check_signal(signal.SIGHUP)


class DemoCase:
    """`vhostpath demo`: works, and leaves nothing behind, also when interrupted."""

    THROUGH_LINE = ""        # what the demo must say of how frames reach the tap

    def leftovers(self, before):
        left = topo.interfaces() - before
        if os.path.exists("/run/netns/vhostpath-demo"):
            left.add("netns vhostpath-demo")
        return left

    def test_demo_succeeds_and_leaves_nothing(self):
        before = topo.interfaces()
        r = topo.run([*topo.tool_command(), "demo"], timeout=600)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn(self.THROUGH_LINE, r.stdout)
        self.assertIn("from the kernel side: 3/3 replies", r.stdout)
        self.assertIn("from the outside host: 3/3 replies", r.stdout)
        self.assertIn("sha256 matches", r.stdout)
        self.assertIn("Forward statistics for port 0 (vpdemo0)", r.stdout)
        self.assertEqual(self.leftovers(before), set())

    def check_interrupted(self, sig):
        before = topo.interfaces()
        with topo.popen([*topo.tool_command(), "demo", "--bytes", str(64 << 20)]) as proc:
            topo.read_until(proc.stdout, "bridging", 300, "bridging line from the demo")
            _, err = topo.interrupt(proc, sig, 120)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("interrupted; everything created was removed", err.decode())
        self.assertEqual(self.leftovers(before), set())

    def test_demo_interrupted_by_sigint(self):
        self.check_interrupted(signal.SIGINT)

    def test_demo_interrupted_by_sigterm(self):
        self.check_interrupted(signal.SIGTERM)


class QueuesCase(OutsideCase):
    """--queues N: N workers (and their vhost threads), flows spread, integrity, clean stop."""

    TAP_IO = "vhost-net"
    ARGS = ()
    QUEUES = 2
    OFFLOADS = False
    IPERF_SECONDS = 3       # each way, 8 flows: enough for them to spread over queues

    def test_queue_pairs_end_to_end(self):
        """N workers, each with its tap queue and vhost threads; 8 parallel flows each way
        spread over at least 2 queues; 20 MB sha256-checked each way; after SIGINT
        per-queue statistics that add up, and no worker, thread or tap left."""
        tool = topo.Tool("--iface", "veth0", "--tap-io", self.TAP_IO, "--queues",
                         str(self.QUEUES), "--address", f"{topo.KERNEL_IP}/24", *self.ARGS)
        self.addCleanup(tool.kill)
        self.assertIn(f"{self.QUEUES} queue pairs", tool.first_line)
        workers = topo.children(tool.pid)
        self.assertEqual(len(workers), self.QUEUES)
        self.assertEqual(topo.tap_queues("tap0"), self.QUEUES)
        threads = [len(topo.vhost_threads(pid)) for pid in workers]
        self.assertEqual(threads, [vhost_threads_per_pair(self.TAP_IO, self.ARGS)] * self.QUEUES)
        self.assertEqual(topo.vhost_threads(tool.pid), [])
        self.assertGreater(topo.iperf3(8, self.IPERF_SECONDS), 0)
        self.assertGreater(topo.iperf3(8, self.IPERF_SECONDS, reverse=True), 0)
        for direction in ("in", "out"):
            sent, received = topo.tcp_transfer(direction, 20 * MB)
            self.assertEqual(sent, received, direction)
            self.assertTrue(sent.startswith(f"{20 * MB} "))
        rc, out, err = tool.stop(signal.SIGINT)
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


class PersistentQueuesCase(OutsideCase):
    """--queues 2 on a multi-queue tap made before (once per tier: the set-up is
    the same whatever the queue count or NIC I/O)."""

    TAP_IO = "vhost-net"
    QUEUES = 2

    def test_a_persistent_multi_queue_tap_is_put_back_as_found(self):
        """A multi-queue tap made before: the workers use its queues; when the tool
        stops, its MTU, state and addresses are put back."""
        found = topo.persistent_tap(self, "vpkeep0", "multi_queue")
        tool = topo.Tool("--iface", "veth0", "--tap-io", self.TAP_IO, "--queues",
                         str(self.QUEUES), "--tap", "vpkeep0", "--address",
                         f"{topo.KERNEL_IP}/24")
        self.addCleanup(tool.kill)
        self.assertIn("vpkeep0 attached (a persistent tap", tool.first_line)
        self.assertEqual(topo.tap_queues("vpkeep0"), self.QUEUES)
        self.assertEqual(topo.ping(topo.OUTSIDE_IP), 3)
        self.assertNotEqual(topo.link_state("vpkeep0"), found)
        rc, _, err = tool.stop(signal.SIGINT)
        self.assertEqual(rc, 0, err)
        self.assertEqual(topo.link_state("vpkeep0"), found)


class QueuesShutdownCase(OutsideCase):
    """Stopping the parent of --queues 2 by SIGTERM or SIGKILL, or losing a worker,
    leaves no worker and no tap, and the NIC's settings as they were."""

    TAP_IO = "vhost-net"

    def setUp(self):
        super().setUp()
        self.original = topo.nic_settings()

    def check(self, pid_to_kill, sig):
        """Start --queues 2, send ``sig`` to ``pid_to_kill(tool, workers)``; return the
        tool's exit status and stderr once everything is gone."""
        tool = topo.Tool("--iface", "veth0", "--tap-io", self.TAP_IO, "--queues", "2")
        try:
            workers = topo.children(tool.pid)
            self.assertEqual(len(workers), 2)
            os.kill(pid_to_kill(tool, workers), sig)
            _, err = tool.proc.communicate(timeout=60)
        finally:
            tool.kill()
        topo.wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in workers), 60,
                        "the workers to exit")
        topo.wait_until(lambda: "tap0" not in topo.interfaces(), 60, "tap0 to disappear")
        for pid in workers:
            self.assertEqual(topo.vhost_threads(pid), [])
        self.assertEqual(topo.nic_settings(), self.original)
        return tool.proc.returncode, err.decode()

    def test_sigterm(self):
        self.assertEqual(self.check(lambda tool, _: tool.pid, signal.SIGTERM)[0], 0)

    def test_sigkill_of_the_parent(self):
        self.assertEqual(self.check(lambda tool, _: tool.pid, signal.SIGKILL)[0],
                         -signal.SIGKILL)

    def test_a_failing_worker_stops_the_others(self):
        rc, err = self.check(lambda _, workers: workers[1], signal.SIGKILL)
        self.assertEqual(rc, 1)
        self.assertEqual(err.strip().splitlines()[-1],
                         "vhostpath: a queue worker failed; all stopped")

    def test_a_worker_stopped_alone_stops_the_others(self):
        """A worker that exits cleanly on its own signal, not the parent's, leaves
        its queue pair unserved: that is a failure too."""
        rc, err = self.check(lambda _, workers: workers[0], signal.SIGTERM)
        self.assertEqual(rc, 1)
        self.assertEqual(err.strip().splitlines()[-1],
                         "vhostpath: a queue worker failed; all stopped")


class UnwindCase(OutsideCase):
    """Set-up failing at each of its steps (a fault injected at the n-th call of each
    step a clean build makes), or refused by the kernel, leaves no fd, tap, thread,
    vhost thread, packet ring or NIC setting behind."""

    TAP_IO = "vhost-net"
    NIC_IO = None
    STEPS = (("Arena", "__init__"), ("PacketRxRing", "__init__"), ("VhostNet", "__init__"),
             ("VhostDevices", "eventfd"), ("SplitVirtqueue", "__init__"),
             ("VhostNet", "set_features"), ("VhostNet", "set_mem_table"),
             ("VhostNet", "set_vring"), ("Tap", "set_virtio_net"), ("Tap", "set_sndbuf"),
             ("VhostNet", "set_backend"), ("QuietNic", "__init__"), ("_MsgBatch", "__init__"))

    def setUp(self):
        super().setUp()
        self.nic = vp.PacketSocket("veth0")
        self.addCleanup(self.nic.close)

    def config(self, **options):
        return vp.Config(tap_io=self.TAP_IO, nic_io=self.NIC_IO, queue_size=64, **options)

    def snapshot(self):
        topo.wait_until(lambda: not topo.vhost_threads(os.getpid()), 10, "vhost threads exit")
        return (sorted(os.listdir("/proc/self/fd")), topo.interfaces(),
                threading.active_count(), topo.nic_settings(), os.listdir(vp.STATE_DIR)
                if os.path.isdir(vp.STATE_DIR) else [])

    def build(self, config, built=lambda: None):
        """open_bridge and its teardown; ``built()`` runs in between."""
        with contextlib.ExitStack() as stack:
            vp.open_bridge(config, self.nic, stack)
            built()

    def check_unwound(self, before, config):
        self.assertEqual(self.snapshot(), before)
        # The NIC socket was given back as it was: it takes a receive ring again.
        vp.PacketRxRing(self.nic, 64, 1514).close()

    @contextlib.contextmanager
    def patched(self, cls_name, name, wrapper):
        cls = getattr(vp, cls_name)
        real = cls.__dict__[name]
        setattr(cls, name, wrapper(real))
        try:
            yield
        finally:
            setattr(cls, name, real)

    def count_calls(self, config):
        """How often a clean set-up calls each step (its teardown not counted)."""
        counts = dict.fromkeys(self.STEPS, 0)
        setting_up = [True]
        with contextlib.ExitStack() as patches:
            for step in self.STEPS:
                def wrapper(real, step=step):
                    def counted(*args, **kw):
                        counts[step] += setting_up[0]
                        return real(*args, **kw)
                    return counted
                patches.enter_context(self.patched(*step, wrapper))
            self.build(config, lambda: setting_up.__setitem__(0, False))
        return {step: n for step, n in counts.items() if n}

    def test_each_step_failing_unwinds(self):
        config = self.config()
        before = self.snapshot()
        counts = self.count_calls(config)
        self.assertGreaterEqual(len(counts), 3, counts)
        self.check_unwound(before, config)
        for step, n in counts.items():
            for k in range(n):
                def wrapper(real, k=k):
                    calls = [0]

                    def failing(*args, **kw):
                        calls[0] += 1
                        if calls[0] == k + 1:
                            raise OSError(errno.EIO, "injected")
                        return real(*args, **kw)
                    return failing
                with self.subTest(step=f"{'.'.join(step)}, call {k + 1} of {n}"):
                    with self.patched(*step, wrapper):
                        with self.assertRaisesRegex(OSError, "injected"):
                            self.build(config)
                    self.check_unwound(before, config)

    def test_tap_in_use_unwinds(self):
        with vp.Tap("vpbusy0"):
            before = self.snapshot()
            with self.assertRaises(OSError) as cm:
                self.build(self.config(tap="vpbusy0"))
            self.assertEqual(cm.exception.errno, errno.EBUSY)
            self.check_unwound(before, None)


class LinkLossCase(OutsideCase):
    """The NIC or the tap going away ends the tool within seconds, with a one-line
    message, exit status 1 and nothing left; the NIC going down and up does not end
    it, costs no CPU meanwhile, and traffic flows again after."""

    TAP_IO = "vhost-net"
    ARGS = ()

    def start(self, *args):
        tool = topo.Tool("--iface", "veth0", "--tap-io", self.TAP_IO,
                         "--address", f"{topo.KERNEL_IP}/24", *self.ARGS, *args)
        self.addCleanup(tool.kill)
        self.assertEqual(topo.ping(topo.OUTSIDE_IP), 3)
        return tool

    def check_gone(self, delete, message):
        """Within seconds of ``delete()``, exit status 1 with ``message``, nothing left
        behind, and little CPU used meanwhile (no loop that wakes without progress)."""
        tool = self.start()
        before = topo.cpu_seconds(tool.pid)
        delete()
        rc, err, cpu = tool.exit_cpu(30)
        self.assertEqual(rc, 1, err)
        self.assertLess(cpu - before, 1.0, "CPU seconds from the loss to the exit")
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(message, lines[0])
        self.assertNotIn("tap0", topo.interfaces())
        self.assertEqual(topo.vhost_threads(tool.pid), [])

    def test_nic_deleted(self):
        self.check_gone(lambda: topo.sh("ip", "link", "del", "veth0"), "veth0 was removed")

    def test_tap_deleted(self):
        self.check_gone(lambda: topo.sh("ip", "link", "del", "tap0"), "tap0 was deleted")

    def test_nic_down_and_up(self):
        tool = self.start()
        topo.sh("ip", "link", "set", "veth0", "down")
        before = topo.cpu_seconds(tool.pid)
        self.assertEqual(topo.ping(topo.OUTSIDE_IP, count=2, wait=2), 0)
        used = topo.cpu_seconds(tool.pid) - before
        self.assertLess(used, 0.5, "CPU seconds while the NIC was down")
        topo.sh("ip", "link", "set", "veth0", "up")
        topo.wait_until(lambda: topo.ping(topo.OUTSIDE_IP, count=1) == 1, 30,
                        "ping through the path once the NIC is back up")
        self.assertIsNone(tool.proc.poll())
        rc, _, err = tool.stop()
        self.assertEqual(rc, 0, err)


class LifeCycleCase(OutsideCase):
    """The tap follows the NIC (carrier, MTU), is configured and placed by the tool
    (--address, --netns, --mac nic), rides out the NIC's link flapping, and what
    the tool changes on the NIC is put back after a SIGKILL, by the next start or
    by `vhostpath cleanup`."""

    TAP_IO = "vhost-net"
    ARGS = ()
    PACKET_RING = True       # NIC I/O vhost-net: a packet receive ring, sized for the MTU
    CTR = "vpctr"            # the --netns namespace

    def start(self, *args):
        tool = topo.Tool("--iface", "veth0", "--tap-io", self.TAP_IO, *self.ARGS, *args)
        self.addCleanup(tool.kill)
        return tool

    def tap_state(self, ns=None):
        """(operstate, carrier, mtu) of tap0 as sysfs shows them."""
        read = [f"/sys/class/net/tap0/{name}" for name in ("operstate", "carrier", "mtu")]
        return tuple(topo.sh("cat", path, ns=ns).strip() for path in read)

    def test_the_next_tap_announces_its_mac(self):
        """The outside knows the kernel side's address under one run's tap MAC; the
        next run's tap (another random MAC) announces its address as it comes up
        (a gratuitous ARP), so the outside's entry names the new MAC with no
        traffic from the kernel side."""
        macs = []
        for run in range(2):
            tool = self.start("--address", f"{topo.KERNEL_IP}/24")
            macs.append(topo.sh("cat", "/sys/class/net/tap0/address").strip())
            if run == 0:
                self.assertEqual(topo.ping(topo.KERNEL_IP, ns=topo.NS), 3)
            topo.wait_until(lambda: topo.neighbour(topo.KERNEL_IP, ns=topo.NS) == macs[-1], 10,
                            f"the outside's neighbour entry for {topo.KERNEL_IP} to name "
                            f"{macs[-1]}")
            rc, _, err = tool.stop()
            self.assertEqual(rc, 0, err)
        self.assertNotEqual(macs[0], macs[1])

    def test_a_persistent_tap_is_put_back_as_found(self):
        """A tap made before (``ip tuntap add``) is used, and at exit its MTU, MAC, state
        and addresses are put back; --netns is refused for it (there it would stay)."""
        found = topo.persistent_tap(self, "vpkeep0")
        tool = self.start("--tap", "vpkeep0", "--address", f"{topo.KERNEL_IP}/24",
                          "--mac", "02:00:00:00:00:99")
        self.assertIn("vpkeep0 attached (a persistent tap: put back as found at exit)",
                      tool.first_line)
        self.assertEqual(topo.ping(topo.OUTSIDE_IP), 3)
        mtu, mac, up, addresses = topo.link_state("vpkeep0")
        self.assertEqual((mtu, mac, up), ("1500", "02:00:00:00:00:99", True))
        self.assertIn(f"{topo.KERNEL_IP}/24", addresses)
        rc, _, err = tool.stop()
        self.assertEqual(rc, 0, err)
        self.assertEqual(topo.link_state("vpkeep0"), found)
        topo.sh("ip", "netns", "add", self.CTR)
        self.addCleanup(topo.sh, "ip", "netns", "del", self.CTR, check=False)
        r = topo.run([*topo.tool_command(), "--iface", "veth0", "--tap-io", self.TAP_IO,
                      *self.ARGS, "--tap", "vpkeep0", "--netns", self.CTR], timeout=60)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(r.stderr.strip().splitlines()[-1],
                         f"vhostpath: vpkeep0 is a persistent tap (it existed before): it stays "
                         f"in its network namespace, not {self.CTR}; a tap vhostpath creates "
                         "is moved there")
        self.assertEqual(topo.link_state("vpkeep0"), found)

    def test_a_renamed_tap_is_reported_under_its_new_name(self):
        """The tool follows a rename of its tap (while down: Linux 6.1 refuses to
        rename an up link, EBUSY): it forwards as before, and its statistics name
        the tap as it is called now, each queue pair's line too."""
        for queues in ((), ("--queues", "2")):
            with self.subTest(queues=queues):
                tool = self.start(*queues)
                topo.sh("ip", "link", "set", "tap0", "name", "vpnew0")
                topo.configure_tap("vpnew0")
                self.assertEqual(topo.ping(topo.OUTSIDE_IP), 3)
                rc, out, err = tool.stop()
                self.assertEqual(rc, 0, err)
                self.assertIn("Forward statistics for port 1 (vpnew0)", out)
                self.assertGreaterEqual(topo.report_counters(out)["vpnew0"]["RX-packets"], 6,
                                        out)
                self.assertNotIn("tap0", out)
                if queues:
                    self.assertEqual(len(re.findall(r"\| vpnew0: rx", out)), 2, out)

    def test_a_persistent_tap_is_put_back_after_sigkill(self):
        """After a SIGKILL a persistent tap is left as the tool made it, with a record
        of what it was, which `cleanup --tap` puts back (refused while the tool
        runs); after another SIGKILL the next start does, and its stop too."""
        found = topo.persistent_tap(self, "vpkeep0")
        notify = "/proc/sys/net/ipv4/conf/vpkeep0/arp_notify"
        notify_found = topo.sh("cat", notify).strip()
        record = "/run/vhostpath/tap/vpkeep0.json"
        args = ("--tap", "vpkeep0", "--address", f"{topo.KERNEL_IP}/24",
                "--mac", "02:00:00:00:00:99")
        tool = self.start(*args)
        cleanup = [*topo.tool_command(), "cleanup", "--iface", "veth0", "--tap", "vpkeep0"]
        r = topo.run([*topo.tool_command(), "cleanup", "--tap", "vpkeep0"], timeout=60)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(r.stderr.strip().splitlines()[-1],
                         f"vhostpath: vpkeep0 is attached by vhostpath (pid {tool.pid}); "
                         "stop it first")
        for restart in (False, True):
            tool.proc.kill()
            tool.proc.communicate()
            mtu, mac, up, addresses = topo.link_state("vpkeep0")
            self.assertEqual((mtu, mac, up), ("1500", "02:00:00:00:00:99", True))
            self.assertIn(f"{topo.KERNEL_IP}/24", addresses)
            self.assertEqual(topo.sh("cat", notify).strip(), "1")
            self.assertTrue(os.path.exists(record))
            if restart:
                tool = self.start(*args)
                rc, _, err = tool.stop()
                self.assertEqual(rc, 0, err)
            else:
                r = topo.run(cleanup, timeout=60)        # the NIC's record too
                self.assertEqual(r.returncode, 0, r.stderr)
                err = r.stderr
                self.assertEqual(topo.link_state("vpkeep0"), found)
                self.assertEqual(topo.sh("cat", notify).strip(), notify_found)
                self.assertFalse(os.path.exists(record))
                tool = self.start(*args)
            self.assertIn("put back vpkeep0 as it was found (left changed by a vhostpath "
                          "that was killed)", err)
        self.assertEqual(topo.link_state("vpkeep0"), found)
        self.assertEqual(topo.sh("cat", notify).strip(), notify_found)
        self.assertFalse(os.path.exists(record))

    def test_a_renamed_persistent_tap_is_put_back_under_its_new_name(self):
        """A persistent tap renamed while the tool runs gets its sysctls back under its
        new name at exit; the link that took its old name is left alone."""
        topo.persistent_tap(self, "vpkeep0")
        notify = "/proc/sys/net/ipv4/conf/{}/arp_notify"
        found = topo.sh("cat", notify.format("vpkeep0")).strip()
        tool = self.start("--tap", "vpkeep0")
        self.assertEqual(topo.sh("cat", notify.format("vpkeep0")).strip(), "1")
        topo.sh("ip", "link", "set", "vpkeep0", "name", "vpkeep1")
        self.addCleanup(topo.sh, "ip", "link", "del", "vpkeep1", check=False)
        topo.sh("ip", "tuntap", "add", "vpkeep0", "mode", "tap")
        topo.sh("sysctl", "-qw", "net.ipv4.conf.vpkeep0.arp_notify=1")
        rc, _, err = tool.stop()
        self.assertEqual(rc, 0, err)
        self.assertEqual(topo.sh("cat", notify.format("vpkeep1")).strip(), found)
        self.assertEqual(topo.sh("cat", notify.format("vpkeep0")).strip(), "1")

    def test_mtu_follows_the_nic(self):
        """tap0 takes a 9000-byte NIC's MTU at start; a change while a transfer runs is
        followed, the transfer loses nothing, and DF pings of the new size cross both
        ways."""
        for dev, ns in (("veth0", None), ("veth1", topo.NS)):
            topo.sh("ip", "link", "set", dev, "mtu", "9000", ns=ns)
        tool = self.start("--address", f"{topo.KERNEL_IP}/24")
        self.assertEqual(self.tap_state()[2], "9000")
        self.assertEqual(topo.ping(topo.OUTSIDE_IP, size=9000 - 28), 3)
        ring = topo.socket_mappings(tool.pid)
        self.assertEqual(len(ring), int(self.PACKET_RING))
        transfer = _Background(topo.tcp_transfer, "in", 16 * MB)
        for mtu in ("4000", "16000"):          # down, then above the start's
            for dev, ns in (("veth1", topo.NS), ("veth0", None)):
                topo.sh("ip", "link", "set", dev, "mtu", mtu, ns=ns)
            topo.wait_until(lambda: self.tap_state()[2] == mtu, 10, f"tap0 at MTU {mtu}")
        sent, received = transfer.result(300)
        self.assertEqual(sent, received)
        if self.PACKET_RING:                   # made again with slots for 16000 bytes
            resized = topo.socket_mappings(tool.pid)
            self.assertEqual(len(resized), 1)
            self.assertNotEqual(resized, ring)
        for target, ns in ((topo.OUTSIDE_IP, None), (topo.KERNEL_IP, topo.NS)):
            self.assertEqual(topo.ping(target, ns=ns, size=16000 - 28), 3, target)
        rc, _, err = tool.stop()
        self.assertEqual(rc, 0, err)

    def test_nic_mtu_above_the_taps_largest(self):
        """A NIC's MTU above what a tap takes (65535 on a veth, 65521 on a tap): tap0
        takes its largest, and the bridge goes on."""
        tool = self.start("--address", f"{topo.KERNEL_IP}/24")
        for dev, ns in (("veth1", topo.NS), ("veth0", None)):
            topo.sh("ip", "link", "set", dev, "mtu", "65535", ns=ns)
        topo.wait_until(lambda: self.tap_state()[2] == str(vp.TAP_MAX_MTU), 10,
                        f"tap0 at MTU {vp.TAP_MAX_MTU}")
        for target, ns in ((topo.OUTSIDE_IP, None), (topo.KERNEL_IP, topo.NS)):
            self.assertEqual(topo.ping(target, ns=ns, size=16000 - 28), 3, target)
        rc, _, err = tool.stop()
        self.assertEqual(rc, 0, err)

    def test_address_netns_and_nic_mac(self):
        """--netns with IPv4 and IPv6 --address and --mac nic: tap0 is in the namespace,
        up, with both addresses and the NIC's MAC; pings and sha256-checked transfers
        cross both ways; the namespace is as it was after the stop."""
        topo.sh("ip", "netns", "add", self.CTR)
        self.addCleanup(topo.sh, "ip", "netns", "del", self.CTR, check=False)
        # No duplicate address detection for tap0 there (it takes the namespace's
        # defaults when it moves in), so no wait for it.
        topo.sh("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", ns=self.CTR)
        topo.sh("ip", "addr", "add", "fd00:1::2/64", "dev", "veth1", "nodad", ns=topo.NS)
        tool = self.start("--netns", self.CTR, "--address", f"{topo.KERNEL_IP}/24",
                          "--address", "fd00:1::1/64", "--mac", "nic")
        self.assertNotIn("tap0", topo.interfaces())
        self.assertEqual(topo.sh("cat", "/sys/class/net/tap0/address", ns=self.CTR),
                         topo.sh("cat", "/sys/class/net/veth0/address"))
        self.assertEqual(topo.ping(topo.OUTSIDE_IP, ns=self.CTR), 3)
        self.assertEqual(topo.ping("fd00:1::2", ns=self.CTR), 3)
        self.assertEqual(topo.ping(topo.KERNEL_IP, ns=topo.NS), 3)
        self.assertEqual(topo.ping("fd00:1::1", ns=topo.NS), 3)
        for direction in ("in", "out"):
            sent, received = topo.tcp_transfer(direction, 4 * MB, kernel_ns=self.CTR)
            self.assertEqual(sent, received, direction)
            self.assertTrue(sent.startswith(f"{4 * MB} "), direction)
        rc, _, err = tool.stop()
        self.assertEqual(rc, 0, err)
        self.assertEqual(len(topo.sh("ip", "-o", "link", "show", ns=self.CTR).splitlines()), 1)

    def test_carrier_follows_the_nic_and_flapping_loses_no_byte(self):
        """tap0's carrier goes off and on with veth0's, three times while a transfer
        runs: TCP recovers every byte, traffic flows after, and each change is
        counted."""
        tool = self.start("--address", f"{topo.KERNEL_IP}/24")
        self.assertEqual(self.tap_state()[1], "1")
        transfer = _Background(topo.tcp_transfer, "out", 64 * MB)
        topo.wait_until(lambda: topo.counter("veth1", "rx_bytes", ns=topo.NS) > MB, 60,
                        "the transfer to be under way")
        flaps_during = 0
        for _ in range(3):
            # The outside end down: veth0 loses its carrier, so must tap0.
            topo.sh("ip", "link", "set", "veth1", "down", ns=topo.NS)
            topo.wait_until(lambda: self.tap_state()[:2] == ("down", "0"), 10,
                            "tap0's carrier to go off with veth0's")
            topo.sh("ip", "link", "set", "veth1", "up", ns=topo.NS)
            topo.wait_until(lambda: self.tap_state()[:2] == ("up", "1"), 10,
                            "tap0's carrier to come back with veth0's")
            flaps_during += transfer.running()
        sent, received = transfer.result(300)
        self.assertEqual(sent, received)
        self.assertTrue(sent.startswith(f"{64 * MB} "))
        self.assertGreaterEqual(flaps_during, 1, "the transfer ended before a flap")
        self.assertEqual(topo.ping(topo.OUTSIDE_IP), 3)
        rc, out, err = tool.stop()
        self.assertEqual(rc, 0, err)
        self.assertIn("Link: up, 6 changes", out)

    def test_host_changes_put_back_after_sigkill(self):
        """While one runs, a second start on the NIC and cleanup are refused; after a
        SIGKILL the NIC is left quiet with a record of what it was, which cleanup
        puts back; after another SIGKILL the next start does, and its stop too."""
        topo.sh("sysctl", "-qw", "net.ipv4.conf.veth0.arp_ignore=2")
        original = topo.nic_settings()
        self.assertNotEqual(original, topo.QUIET)
        record = "/run/vhostpath/veth0.json"
        tool = self.start()
        cleanup = [*topo.tool_command(), "cleanup", "--iface", "veth0"]
        for args in (["--iface", "veth0", "--tap", "vp1"], ["cleanup", "--iface", "veth0"]):
            r = topo.run([*topo.tool_command(), *args], timeout=60)
            self.assertEqual(r.returncode, 1, args)
            self.assertEqual(r.stderr.strip().splitlines()[-1],
                             f"vhostpath: veth0 is bridged by vhostpath (pid {tool.pid}); "
                             "stop it first")
        for restart in (False, True):
            tool.proc.kill()
            tool.proc.communicate()
            self.assertEqual(topo.nic_settings(), topo.QUIET)
            self.assertTrue(os.path.exists(record))
            if restart:
                tool = self.start()
                self.assertEqual(topo.nic_settings(), topo.QUIET)
                rc, _, err = tool.stop()
                self.assertEqual(rc, 0, err)
            else:
                r = topo.run(cleanup, timeout=60)
                self.assertEqual(r.returncode, 0, r.stderr)
                err = r.stderr
                self.assertEqual(topo.nic_settings(), original)
                tool = self.start()
            self.assertIn("put back net.ipv4.conf.veth0.arp_ignore=2, "
                          "net.ipv4.conf.veth0.rp_filter=0", err)
        self.assertEqual(topo.nic_settings(), original)
        self.assertFalse(os.path.exists(record))


class _Background:
    """``function(*args)`` in a thread; ``result(timeout)`` returns what it returned or
    raises what it raised."""

    def __init__(self, function, *args):
        self._outcome = []
        self._thread = threading.Thread(target=self._run, args=(function, args), daemon=True)
        self._thread.start()

    def _run(self, function, args):
        try:
            self._outcome.append((True, function(*args)))
        except BaseException as e:            # handed to result()
            self._outcome.append((False, e))

    def running(self):
        return self._thread.is_alive()

    def result(self, timeout):
        self._thread.join(timeout)
        if not self._outcome:
            raise AssertionError(f"still running after {timeout} s")
        ok, value = self._outcome[0]
        if not ok:
            raise value
        return value


class UdpGsoCase(OutsideCase):
    """A UDP GSO send from the kernel side crosses as one super-frame where the tap
    takes UDP segmentation offload (TUN_F_USO4/6, Linux 6.2), segmented before the
    tap before that; either way every datagram arrives intact."""

    TAP_IO = "vhost-net"
    ARGS = ()
    PACKET_RING = True       # NIC I/O vhost-net: -v says its buffers towards the NIC

    def test_udp_gso_send_crosses(self):
        tool = topo.Tool("--iface", "veth0", "--tap-io", self.TAP_IO, "-v",
                         "--address", f"{topo.KERNEL_IP}/24", *self.ARGS)
        self.addCleanup(tool.kill)
        self.assertEqual(topo.ping(topo.OUTSIDE_IP, count=1), 1)   # ARP settled
        sent, received = topo.udp_gso_send()
        self.assertEqual(sent, received)
        rc, out, err = tool.stop()
        self.assertEqual(rc, 0, err)
        over_mtu = topo.report_counters(out)["veth0"]["TX-over-MTU"]
        if topo.kernel_at_least(6, 2):
            self.assertIn("GUEST_USO4 GUEST_USO6", err)
            self.assertRegex(err, r"tap offloads 0x67 \(CSUM TSO4 TSO6 USO4 USO6\)")
            self.assertGreater(over_mtu, 0, out)
        else:                                  # refused: the features say so, nothing fails
            self.assertNotIn("USO", err)
            self.assertEqual(over_mtu, 0, out)
        if self.PACKET_RING:                   # merged buffers where the socket takes 12 bytes
            self.assertIn("merged 16384-byte buffers (a 12-byte header" if
                          topo.kernel_at_least(6, 4) else "whole-frame 69632-byte buffers", err)


class BusyPollCase(OutsideCase):
    """--busy-poll (and with vhost-net, --vhost-busy-poll): sha256-checked transfers
    both ways, passes that found work counted, and once the windows have passed
    without traffic, the process and its vhost threads asleep."""

    TAP_IO = "vhost-net"

    def test_busy_poll_forwards_then_sleeps(self):
        vhost = ("--vhost-busy-poll", "2000") if self.TAP_IO == "vhost-net" else ()
        tool = topo.Tool("--iface", "veth0", "--tap-io", self.TAP_IO, "--busy-poll", "2000",
                         *vhost, "-v", "--address", f"{topo.KERNEL_IP}/24")
        self.addCleanup(tool.kill)
        for direction in ("in", "out"):
            sent, received = topo.tcp_transfer(direction, 8 * MB)
            self.assertEqual(sent, received, direction)
        # The window is 2 ms: what runs past it without traffic is not busy-polling.
        # (A measurement over an interval, not a wait for an event.)
        before = topo.cpu_seconds(tool.pid)
        time.sleep(3)
        self.assertLess(topo.cpu_seconds(tool.pid) - before, 0.3, "CPU seconds over 3 idle s")
        rc, out, err = tool.stop()
        self.assertEqual(rc, 0, err)
        self.assertIn("busy-poll: 2000 us after a pass that moved frames", err)
        self.assertEqual("every vring's vhost worker spins 2000 us" in err, bool(vhost), err)
        passes = re.search(r"Busy-poll passes that found work: (\d+)", out)
        self.assertTrue(passes and int(passes.group(1)) > 0, out)

    def test_sparse_traffic_is_busy_polled(self):
        # Pings 50 ms apart, sparse traffic (vp.SPARSE_TRAFFIC), in a 200 ms window:
        # every request after the first comes while the process spins.
        tool = topo.Tool("--iface", "veth0", "--tap-io", self.TAP_IO, "--busy-poll", "200000",
                         "-v", "--address", f"{topo.KERNEL_IP}/24")
        self.addCleanup(tool.kill)
        self.assertEqual(topo.ping(topo.KERNEL_IP, ns=topo.NS, count=20, interval=0.05), 20)
        rc, out, err = tool.stop()
        self.assertEqual(rc, 0, err)
        self.assertIn(f"while traffic is {vp.SPARSE_TRAFFIC}", err)
        passes = re.search(r"Busy-poll passes that found work: (\d+)", out)
        self.assertTrue(passes and int(passes.group(1)) >= 19, out)



# What `tcpdump -ddd 'arp or icmp'` prints: the instruction count, then "code jt jf k".
ARP_OR_ICMP = """7
40 0 0 12
21 3 0 2054
21 0 3 2048
48 0 0 23
21 0 1 1
6 0 0 262144
6 0 0 0
"""


class FilterCase(OutsideCase):
    """--filter: a classic BPF program on the NIC's packet socket(s) decides what
    reaches the kernel through the tap, in each of MODES (further tool options)."""

    TAP_IO = "vhost-net"
    MODES = ((),)

    def program_file(self, text):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        path = os.path.join(tmp.name, "filter.bpf")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_arp_or_icmp_keeps_tcp_from_the_kernel(self):
        """Pings cross both ways; a TCP connect from the outside to a listening socket
        on the kernel side times out, and that kernel's TCP counters do not move:
        its SYNs never reach it.  The tap is in a namespace of its own (--netns),
        where nothing else speaks TCP."""
        path = self.program_file(ARP_OR_ICMP)
        ns = "vpfilter"
        topo.sh("ip", "netns", "add", ns)
        self.addCleanup(topo.sh, "ip", "netns", "del", ns, check=False)
        for mode in self.MODES:
            with self.subTest(mode=mode):
                tool = topo.Tool("--iface", "veth0", "--tap-io", self.TAP_IO, "--netns", ns,
                                 "--address", f"{topo.KERNEL_IP}/24", "--filter", path, *mode)
                self.addCleanup(tool.kill)
                self.assertEqual(topo.ping(topo.OUTSIDE_IP, ns=ns), 3)
                self.assertEqual(topo.ping(topo.KERNEL_IP, ns=topo.NS), 3)
                with vp.socket_in_netns(ns) as listener:
                    listener.bind((topo.KERNEL_IP, 0))
                    listener.listen(1)
                    listener.setblocking(False)
                    before = self.tcp_in_segs(ns)
                    with vp.socket_in_netns(topo.NS) as client:
                        client.settimeout(2)
                        with self.assertRaises(socket.timeout):
                            client.connect((topo.KERNEL_IP, listener.getsockname()[1]))
                    self.assertEqual(self.tcp_in_segs(ns), before)
                    with self.assertRaises(BlockingIOError):
                        listener.accept()
                rc, out, err = tool.stop()
                self.assertEqual(rc, 0, err)

    @staticmethod
    def tcp_in_segs(ns):
        """Tcp InSegs of /proc/net/snmp in namespace ``ns``."""
        lines = [line.split() for line in topo.sh("cat", "/proc/net/snmp", ns=ns).splitlines()
                 if line.startswith("Tcp:")]
        return int(lines[1][lines[0].index("InSegs")])

    def test_malformed_program_fails_before_anything_is_made(self):
        before = (topo.interfaces(), topo.nic_settings())
        for text, why in (("7\n40 0 0 12\n", "says 7 instructions but has 1"),
                          ("2\n40 0 0 12\n21 9 0 2054\n", "the kernel refuses the program"),
                          ("1\nret 0 0 0\n", "line 2: expected 'code jt jf k'")):
            with self.subTest(why=why):
                path = self.program_file(text)
                proc = subprocess.run([*topo.tool_command(), "--iface", "veth0",
                                       "--tap-io", self.TAP_IO, "--filter", path],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      universal_newlines=True, timeout=60)
                self.assertEqual(proc.returncode, 1, proc.stderr)
                lines = proc.stderr.splitlines()
                self.assertEqual(len(lines), 1, proc.stderr)
                self.assertTrue(lines[0].startswith(f"vhostpath: --filter: {path}: "), lines)
                self.assertIn(why, lines[0])
                self.assertEqual((topo.interfaces(), topo.nic_settings()), before)


class HookCase(OutsideCase):
    """Bridge(hook=...): each verdict does what it says, and is counted."""

    TAP_IO = "vhost-net"
    DROP_PORT, KEEP_PORT, DATAGRAMS = 9998, 9999, 5

    def start(self, hook):
        nic = vp.PacketSocket("veth0")
        self.addCleanup(nic.close)
        config = vp.Config(tap_io=self.TAP_IO, address=[f"{topo.KERNEL_IP}/24"])
        port = vp.VirtioUserPort(config) if self.TAP_IO == "vhost-net" else vp.TapPort(config)
        self.addCleanup(port.close)
        bridge = vp.Bridge(nic, port, hook=hook)
        self.addCleanup(bridge.close)
        worker = _Background(bridge.run)
        self.addCleanup(self.stop, bridge, worker)
        return bridge, worker

    def stop(self, bridge, worker):
        bridge.stop()
        with contextlib.suppress(vp.VhostPathError):       # what a test checked
            worker.result(30)

    def test_pass_bounce_drop_keep(self):
        """Echo requests to the kernel side are answered by the hook inwards (BOUNCE,
        TTL 222), and those from the kernel outwards too; UDP to one port is
        dropped, to another kept (the hook has the payloads, the kernel none);
        the rest passes (a sha256-checked transfer each way)."""
        from tests.example_responder import MARK_TTL, echo_reply
        kept, seen = [], {vp.INWARD: 0, vp.OUTWARD: 0}
        kernel, outside = (socket.inet_aton(ip) for ip in (topo.KERNEL_IP, topo.OUTSIDE_IP))

        def hook(direction, frame):
            seen[direction] += 1
            reply = echo_reply(vp.Frame(bytes(frame)),
                               kernel if direction == vp.INWARD else outside)
            if reply is not None:
                frame[:] = reply
                return vp.BOUNCE
            udp = len(frame) >= 42 and frame[12:14] == b"\x08\x00" and frame[23] == 17
            port = int.from_bytes(frame[36:38], "big") if udp else None
            if direction == vp.INWARD and port == self.DROP_PORT:
                return vp.DROP
            if direction == vp.INWARD and port == self.KEEP_PORT:
                kept.append(bytes(frame[42:]))
                return vp.KEEP
            return vp.PASS

        bridge, worker = self.start(hook)
        for target, ns in ((topo.KERNEL_IP, topo.NS), (topo.OUTSIDE_IP, None)):
            out = topo.sh("ping", "-c", "3", "-W", "5", target, ns=ns, check=False)
            self.assertEqual(re.findall(r"ttl=(\d+)", out), [str(MARK_TTL)] * 3, out)
        receivers = []
        for port in (self.DROP_PORT, self.KEEP_PORT):
            receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(receiver.close)
            receiver.bind((topo.KERNEL_IP, port))
            receiver.setblocking(False)
            receivers.append(receiver)
        payloads = [f"datagram {i}".encode() for i in range(self.DATAGRAMS)]
        with vp.socket_in_netns(topo.NS, socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for port in (self.DROP_PORT, self.KEEP_PORT):
                for payload in payloads:
                    sender.sendto(payload, (topo.KERNEL_IP, port))
        topo.wait_until(lambda: len(kept) == self.DATAGRAMS, 10, "the hook kept every datagram")
        for direction in ("in", "out"):
            sent, received = topo.tcp_transfer(direction, 4 * MB)
            self.assertEqual(sent, received, direction)
        for receiver in receivers:      # the transfers came after: nothing is late
            with self.assertRaises(BlockingIOError):
                receiver.recv(100)
        self.assertEqual(kept, payloads)
        nic, tap = bridge.nic_stats, bridge.tap_stats
        self.assertEqual((nic.hook_bounced, nic.hook_dropped, nic.hook_kept),
                         (3, self.DATAGRAMS, self.DATAGRAMS))
        self.assertEqual((tap.hook_bounced, tap.hook_dropped, tap.hook_kept), (3, 0, 0))
        self.assertGreater(min(seen.values()), 100, seen)     # every frame is seen
        self.assertIn(f"Hook: 3 bounced, {self.DATAGRAMS} dropped, {self.DATAGRAMS} kept",
                      bridge.report())
        bridge.stop()
        self.assertIsNone(worker.result(30))

    def test_a_bad_verdict_stops_the_bridge(self):
        bridge, worker = self.start(lambda direction, frame: "forward")
        topo.ping(topo.KERNEL_IP, ns=topo.NS, count=1, wait=2)
        with self.assertRaisesRegex(vp.VhostPathError, "the hook returned 'forward'"):
            worker.result(30)


class ExampleCase(OutsideCase):
    """tests/example_responder.py, the worked example of a Python dataplane: it
    answers pings to the kernel side's address itself (TTL 222) while the kernel
    behind it answers ARP and TCP, with either event loop; SIGINT ends it
    cleanly, tap0 gone and the NIC's settings put back."""

    TAP_IO = "vhost-net"

    def check(self, loop):
        from tests.example_responder import MARK_TTL
        before = (topo.interfaces(), topo.nic_settings())
        with topo.popen([sys.executable, os.path.join(topo.ROOT, "tests", "example_responder.py"),
                         "--iface", "veth0", "--address", f"{topo.KERNEL_IP}/24",
                         "--tap-io", self.TAP_IO, "--loop", loop]) as proc:
            self.assertEqual(topo.readline(proc.stdout, time.monotonic() + 60), "ready\n")
            out = topo.sh("ping", "-c", "3", "-W", "5", topo.KERNEL_IP, ns=topo.NS, check=False)
            self.assertEqual(re.findall(r"ttl=(\d+)", out), [str(MARK_TTL)] * 3, out)
            for direction in ("in", "out"):
                sent, received = topo.tcp_transfer(direction, 4 * MB)
                self.assertEqual(sent, received, direction)
            out, err = topo.interrupt(proc, signal.SIGINT, 30)
            self.assertEqual(proc.returncode, 0, err)
            self.assertRegex(out.decode(), r"answered 3, to kernel \d+, to NIC \d+, waiting 0")
        self.assertEqual((topo.interfaces(), topo.nic_settings()), before)

    def test_selectors(self):
        self.check("selectors")

    def test_asyncio(self):
        self.check("asyncio")
