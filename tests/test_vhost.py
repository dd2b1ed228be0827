"""Guest tier: end-to-end tests against the real /dev/vhost-net (run inside the QEMU guest).

tests/run.py boots the guest and runs this module there; a skip counts as a
failure.  Each test builds what it needs and removes it.
"""

import os
import select
import socket
import struct
import sys
import time
import unittest

import vhostpath as vp
from tests import topo
from tests.cases import (BridgeCase, BusyPollCase, DemoCase, ExampleCase, FilterCase, HookCase,
                         LifeCycleCase, LinkLossCase, OutsideCase, ShutdownCase, UdpGsoCase,
                         UnwindCase, check_closed_port)
OUR_MAC = bytes.fromhex("020000000002")
MB = 1 << 20


def _csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _icmp_echo(dst_mac, src_ip, dst_ip, payload, ident=0x4242):
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", _csum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0x4000, 64, 1, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return dst_mac + OUR_MAC + b"\x08\x00" + ip + icmp


def _arp_request(src_ip, target_ip):
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, OUR_MAC, socket.inet_aton(src_ip),
                      bytes(6), socket.inet_aton(target_ip))
    return b"\xff" * 6 + OUR_MAC + b"\x08\x06" + arp


def _receive(port, match, timeout=20):
    """rx_burst until a frame satisfies ``match``; wait on the RX call eventfd."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        port.ack_calls()
        for frame in port.rx_burst():
            if match(frame):
                return frame
        select.select([port.call_fds()[vp.VHOST_NET_VQ_RX]], [], [],
                      max(0, deadline - time.monotonic()))
    raise AssertionError(f"no matching frame from the kernel within {timeout} s")


class TestVirtioUserPort(unittest.TestCase):
    """The library on its own: a port, frames in and out of the kernel, clean close."""

    def test_bring_up_and_close_leave_nothing(self):
        fds_before = sorted(os.listdir("/proc/self/fd"))
        before = topo.interfaces()
        port = vp.VirtioUserPort(queue_size=256)
        try:
            self.assertEqual(port.name, "tap0")            # named by the kernel
            self.assertNotIn("tap0", before)
            self.assertTrue(port.features & 1 << vp.VIRTIO_NET_F_MRG_RXBUF)
            self.assertEqual(port.hdr_len, 12)
            self.assertEqual(port.tap.vnet_hdr_sz(), 12)
            self.assertEqual(len(topo.vhost_threads(os.getpid())), 1)
        finally:
            port.close()
        self.assertNotIn("tap0", topo.interfaces())
        topo.wait_until(lambda: not topo.vhost_threads(os.getpid()), 10, "vhost thread exit")
        self.assertEqual(sorted(os.listdir("/proc/self/fd")), fds_before, "fd leaked")
        check_closed_port(self, port)

    def test_arp_answered_by_the_kernel(self):
        with vp.VirtioUserPort(mac="02:00:00:00:00:01") as port:
            topo.configure_tap(port.name, "10.9.0.1/24")
            self.assertEqual(port.tx_burst([_arp_request("10.9.0.2", "10.9.0.1")]), 1)
            reply = _receive(port, lambda f: f[12:14] == b"\x08\x06" and f[20:22] == b"\0\2")
            self.assertEqual(reply[:6], OUR_MAC)
            self.assertEqual(reply[22:28], bytes.fromhex("020000000001"))   # tap's MAC
            self.assertEqual(reply[28:32], socket.inet_aton("10.9.0.1"))
            self.assertEqual(port.stats.tx_packets, 1)
            self.assertGreaterEqual(port.stats.rx_packets, 1)

    def test_jumbo_echo_spans_several_buffers_both_ways(self):
        """A 30000-byte ICMP echo goes in as a 2-descriptor TX chain (a buffer and a
        spill area); the reply comes back in >= 4 merged RX buffers (MRG_RXBUF)."""
        with vp.VirtioUserPort(mac="02:00:00:00:00:01", queue_size=64) as port:
            topo.sh("ip", "link", "set", port.name, "mtu", "32000")
            topo.configure_tap(port.name, "10.9.0.1/24")
            topo.sh("ip", "neigh", "add", "10.9.0.2", "lladdr", "02:00:00:00:00:02",
                    "dev", port.name)
            payload = os.urandom(30000)
            frame = _icmp_echo(bytes.fromhex("020000000001"), "10.9.0.2", "10.9.0.1", payload)
            self.assertEqual(port.tx_burst([frame]), 1)
            seen = []
            real_rx_packet = port.rx_packet

            def counting_rx_packet():
                views = real_rx_packet()
                if views is not None:
                    seen.append(len(views))
                return views
            port.rx_packet = counting_rx_packet
            reply = _receive(port, lambda f: f[12:14] == b"\x08\x00" and f[23] == 1
                             and f[34] == 0)
            self.assertEqual(reply[42:], payload)
            self.assertGreaterEqual(max(seen), 4, f"buffers per packet: {seen}")
            self.assertEqual(max(len(c) for c in port.txq.chains if c), 2)


class TestVhostBridgeLibrary(OutsideCase, unittest.TestCase):
    """VhostBridge used as a library: two devices, busy-polling, traffic, stop from another
    thread, close leaves nothing (no fd, no vhost thread, no tap, NIC settings restored)."""

    OFFLOADS = False

    def test_bridge_in_a_thread_and_close(self):
        import threading
        original = topo.nic_settings()
        fds_before = sorted(os.listdir("/proc/self/fd"))
        nic = vp.PacketSocket("veth0")
        bridge = vp.VhostBridge(nic, queue_size=64, rx_cksum=True, lro=True, busy_poll=50,
                                vhost_busy_poll=30)
        worker = threading.Thread(target=bridge.run)
        try:
            self.assertEqual(bridge.name, "tap0")
            # Linux 6.4+: the packet socket's 12-byte header, so merged RX buffers.
            merged = topo.kernel_at_least(6, 4)
            self.assertEqual(bridge.hdr_len, 12 if merged else 10)
            self.assertEqual(bridge.vhost.features, 1 << vp.VIRTIO_RING_F_EVENT_IDX
                             | (1 << vp.VIRTIO_NET_F_MRG_RXBUF if merged else 0))
            self.assertTrue(all(vq.event_idx for vq in (bridge.tap_rxq, bridge.tap_txq,
                                                        bridge.nic_txq)))
            self.assertEqual((bridge.nic_ring.frame_nr, bridge.nic_ring.frame_size), (2048, 2048))
            self.assertEqual(bridge.tap.vnet_hdr_sz(), bridge.hdr_len)
            # Every vring's worker busy-polls as asked (read back from vhost): its own
            # window, not this process's.
            tap_device, nic_device = bridge.vhost.devices
            self.assertEqual([tap_device.vring_busyloop_timeout(vp.VHOST_NET_VQ_RX),
                              tap_device.vring_busyloop_timeout(vp.VHOST_NET_VQ_TX),
                              nic_device.vring_busyloop_timeout(vp.VHOST_NET_VQ_TX)], [30] * 3)
            self.assertEqual(len(topo.vhost_threads(os.getpid())), 2)
            self.assertEqual(topo.nic_settings(), topo.QUIET)
            topo.configure_tap("tap0")
            worker.start()
            self.assertEqual(topo.ping(topo.OUTSIDE_IP), 3)
            # 64-entry rings, 2 MB each way: every buffer is recycled many times.
            for direction in ("in", "out"):
                sent, received = topo.tcp_transfer(direction, 2 << 20)
                self.assertEqual(sent, received, direction)
        finally:
            bridge.stop()
            if worker.ident is not None:
                worker.join(30)
            stuck = worker.is_alive()
            if not stuck:                     # never unmap rings under a running loop
                bridge.close()
            nic.close()
        self.assertFalse(stuck, "run() did not return after stop()")
        self.assertGreater(bridge.nic_stats.rx_packets, 2 << 20 >> 11)
        self.assertEqual(bridge.nic_stats.rx_packets, bridge.tap_stats.tx_packets)
        self.assertEqual(bridge.nic_stats.tx_packets, bridge.tap_stats.rx_packets)
        self.assertFalse(any(vq.broken for vq in (bridge.tap_rxq, bridge.tap_txq,
                                                 bridge.nic_txq)))
        self.assertNotIn("tap0", topo.interfaces())
        topo.wait_until(lambda: not topo.vhost_threads(os.getpid()), 10, "vhost threads exit")
        self.assertEqual(sorted(os.listdir("/proc/self/fd")), fds_before, "fd leaked")
        self.assertEqual(topo.nic_settings(), original)
        with self.assertRaisesRegex(ValueError, r"^tap0: run\(\) after close\(\)$"):
            bridge.run()
        bridge.close()                          # a second close does nothing


class TestRoundTripWakeups(OutsideCase, unittest.TestCase):
    """A ping from the kernel side and its answer cross the default bridge with no
    vhost worker: idle, the tap's RX vring is unbound (TAP_BIND_HOLD), so the
    request wakes the tool, which reads it from the tap and sends it; the answer
    comes back during that send and is written to the tap in the same pass
    (VhostBridge._pass_idle).  A round trip wakes the tool about once and the
    workers not at all; a burst from the kernel in the middle binds the ring, and
    the pings after it, closer together than TAP_BIND_HOLD, do not keep it bound;
    the tool sleeps between round trips and uses no CPU once idle."""

    OFFLOADS = False
    BURST = 16

    def test_round_trips_wake_the_tool_once_each(self):
        tool = topo.Tool("--iface", "veth0", "--address", f"{topo.KERNEL_IP}/24")
        self.addCleanup(tool.kill)
        self.assertEqual(topo.ping(topo.OUTSIDE_IP), 3)       # ARP settled first
        workers = topo.vhost_tasks(tool.pid)
        self.assertEqual(len(workers), 2, "a vhost worker per device")
        before = topo.sleeps(f"/proc/{tool.pid}"), sum(map(topo.sleeps, workers))
        sent = topo.counter("tap0", "tx_packets")
        with topo.popen(["ping", "-c", "100", "-i", "0.02", "-W", "5", topo.OUTSIDE_IP]) as ping:
            topo.wait_until(lambda: topo.counter("tap0", "tx_packets") >= sent + 30, 60,
                            "30 pings sent")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                for _ in range(self.BURST):     # more than DIRECT_BATCH at once: bound
                    udp.sendto(bytes(18), (topo.OUTSIDE_IP, 9))
            out, _ = ping.communicate(timeout=60)
        woken = topo.sleeps(f"/proc/{tool.pid}") - before[0]
        worker_woken = sum(map(topo.sleeps, workers)) - before[1]
        self.assertIn(b"100 received", out)
        self.assertGreaterEqual(woken, 50, f"{woken} wakeups: the tool sleeps between pings")
        self.assertLess(woken, 150, f"{woken} wakeups for 100 round trips: more than one each")
        self.assertLess(worker_woken, 20, f"the vhost workers woke {worker_woken} times")
        cpu = topo.cpu_seconds(tool.pid)
        time.sleep(1)                       # a second's idle CPU, measured: not a wait
        self.assertLess(topo.cpu_seconds(tool.pid) - cpu, 0.05, "CPU seconds when idle")
        rc, out, err = tool.stop()
        self.assertEqual(rc, 0, err)
        counters = topo.report_counters(out)
        for port in counters.values():
            self.assertGreaterEqual(port["TX-direct"], 90, out)
        self.assertGreaterEqual(counters["tap0"]["RX-direct"], 90, out)
        self.assertGreaterEqual(counters["tap0"]["RX-binds"], 1, out)


class TestFullSendBuffer(OutsideCase, unittest.TestCase):
    """Frames read from the tap while the packet socket's send buffer is full (a NIC
    slower than the kernel sends: a tbf qdisc at 8 kbit/s on veth0, and the
    smallest send buffer) have no ring to wait in: each waits NIC_SEND_WAIT for
    room, then is dropped and counted as veth0's TX-dropped.  The bridge neither
    blocks nor spins meanwhile, and carries pings again once the NIC keeps up."""

    OFFLOADS = False
    FRAMES = 20

    def test_frames_are_dropped_and_counted(self):
        old = topo.sh("sysctl", "-n", "net.core.wmem_default").strip()
        topo.sh("sysctl", "-qw", "net.core.wmem_default=4608")     # SOCK_MIN_SNDBUF-ish
        try:
            tool = topo.Tool("--iface", "veth0", "--address", f"{topo.KERNEL_IP}/24")
        finally:
            topo.sh("sysctl", "-qw", f"net.core.wmem_default={old}")
        self.addCleanup(tool.kill)
        self.assertEqual(topo.ping(topo.OUTSIDE_IP), 3)
        topo.sh("sysctl", "-qw", "net.ipv6.conf.tap0.disable_ipv6=1")   # only these frames
        topo.sh("tc", "qdisc", "add", "dev", "veth0", "root", "tbf", "rate", "8kbit",
                "burst", "1600", "limit", "100000")
        cpu, start = topo.cpu_seconds(tool.pid), time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for k in range(self.FRAMES):        # one at a time: each read by the tool
                sent = topo.counter("tap0", "tx_packets")
                udp.sendto(bytes(1000), (topo.OUTSIDE_IP, 9))
                topo.wait_until(lambda: topo.counter("tap0", "tx_packets") > sent, 10,
                                f"datagram {k} read from the tap")
        busy = topo.cpu_seconds(tool.pid) - cpu
        elapsed = time.monotonic() - start
        topo.sh("tc", "qdisc", "del", "dev", "veth0", "root")
        self.assertEqual(topo.ping(topo.OUTSIDE_IP), 3)
        rc, out, err = tool.stop()
        self.assertEqual(rc, 0, err)
        counters = topo.report_counters(out)
        # The few that found room (the qdisc's burst, the buffer's first frames) and
        # the pings went; most of the datagrams were dropped, each counted.
        self.assertGreaterEqual(counters["veth0"]["TX-dropped"], self.FRAMES // 2, out)
        self.assertLessEqual(counters["veth0"]["TX-dropped"], self.FRAMES, out)
        self.assertGreaterEqual(counters["tap0"]["RX-direct"], self.FRAMES, out)
        self.assertLess(busy, elapsed / 2, f"{busy:.2f} CPU seconds in {elapsed:.2f} s")


class RunningBridgeCase(OutsideCase):
    """A VhostBridge (of BRIDGE_OPTIONS) between veth0 and tap0 run by a thread of
    the test, the path checked with a ping."""

    BRIDGE_OPTIONS = {}

    def setUp(self):
        import threading
        super().setUp()
        self.nic = vp.PacketSocket("veth0")
        self.addCleanup(self.nic.close)
        self.bridge = vp.VhostBridge(self.nic, **self.BRIDGE_OPTIONS)
        self.worker = threading.Thread(target=self.bridge.run)
        self.addCleanup(self.stop)
        topo.configure_tap("tap0")
        self.worker.start()
        self.assertEqual(topo.ping(topo.OUTSIDE_IP), 3)

    def stop(self):
        self.bridge.stop()
        self.worker.join(30)
        if not self.worker.is_alive():        # never unmap rings under a running loop
            self.bridge.close()


class TestTapBinds(RunningBridgeCase, unittest.TestCase):
    """Floods from the kernel (pktgen on tap0, at full speed) are more than the tool
    reads from the tap itself: each binds the tap's RX vring to its vhost worker,
    every frame the tap queued is taken by one of them (tun counts a frame as
    sent when it is read), and every one reaches the outside in the order the
    kernel sent it, none overtaking another across the switch.  TAP_BIND_HOLD
    after each, the tool takes the ring back by itself and reads pings from the
    tap again."""

    FRAMES = 2000
    OFFLOADS = False

    def setUp(self):
        super().setUp()
        topo.sh("sysctl", "-qw", "net.ipv6.conf.tap0.disable_ipv6=1")   # only pktgen's frames
        self.catch = vp.socket_in_netns(topo.NS, socket.AF_PACKET, socket.SOCK_RAW,
                                        socket.htons(0x0800))
        self.addCleanup(self.catch.close)
        self.catch.setsockopt(socket.SOL_SOCKET, vp.SO_RCVBUFFORCE, 64 * MB)
        self.catch.bind(("veth1", 0))

    def flood(self):
        """pktgen's frames through the bridge; returns the RX-binds it made."""
        binds = self.bridge.tap_stats.rx_binds
        before = topo.counter("tap0", "tx_packets"), topo.counter("veth0", "tx_dropped")
        topo.pktgen(False, "tap0", self.FRAMES)
        # pktgen counts a frame the tap took (its queue full: dropped and sent again);
        # the kernel may send a frame of its own meanwhile (an ARP answer).
        topo.wait_until(lambda: topo.counter("tap0", "tx_packets") - before[0] >= self.FRAMES,
                        30, "every frame the tap queued read from it")
        expected = self.FRAMES - (topo.counter("veth0", "tx_dropped") - before[1])
        seqs, magic = [], struct.pack("!I", 0xbe9be955)
        deadline = time.monotonic() + 30
        while len(seqs) < expected:
            if not select.select([self.catch], [], [], max(0, deadline - time.monotonic()))[0]:
                self.fail(f"{len(seqs)} of pktgen's {expected} frames reached the outside")
            frame = self.catch.recv(2048)
            if frame[42:46] == magic:
                seqs.append(struct.unpack_from("!I", frame, 46)[0])
        self.assertEqual(seqs, sorted(set(seqs)), "frames overtook one another")
        return self.bridge.tap_stats.rx_binds - binds

    def test_floods_keep_order_then_pings_are_read_directly(self):
        stats = self.bridge.tap_stats
        for _ in range(3):
            self.assertGreater(self.flood(), 0, "the flood went to the vhost worker")
            # TAP_BIND_HOLD after it the tool takes the ring back: pings read directly.
            direct = stats.rx_direct

            def read_directly():
                self.assertEqual(topo.ping(topo.OUTSIDE_IP, count=1), 1)
                return stats.rx_direct > direct
            topo.wait_until(read_directly, 10, "a ping read from the tap again")


class TestTapBindsBusyPoll(TestTapBinds):
    """The same with a busy-poll window longer than the gaps between the test's pings,
    so the tool does not go back to poll() once the flood has passed: it still
    takes the ring back TAP_BIND_HOLD after each flood."""

    BRIDGE_OPTIONS = {"busy_poll": 1000000}


class TestBindDeletedTap(OutsideCase, unittest.TestCase):
    """Binding the tap RX ring to a deleted tap fails in vhost_poll_start (the fd
    polls EPOLLERR: EINVAL): the bridge stops saying the tap was deleted, not with
    the ioctl's error."""

    def test_says_the_tap_was_deleted(self):
        nic = vp.PacketSocket("veth0")
        self.addCleanup(nic.close)
        bridge = vp.VhostBridge(nic)            # not running: its passes are ours
        self.addCleanup(bridge.close)
        topo.sh("ip", "link", "del", "tap0")
        with vp.socket_in_netns(topo.NS, socket.AF_PACKET, socket.SOCK_RAW, 0) as outside:
            outside.bind(("veth1", 0))
            for _ in range(2):                  # two frames at once: the full pass, bound
                outside.send(b"\xff" * 6 + OUR_MAC + b"\x88\xb5" + bytes(46))
        topo.wait_until(lambda: bridge.nic_ring.ready(0, 2) == 2, 10,
                        "two frames in the packet ring")
        with self.assertRaisesRegex(vp.VhostPathError, r"^tap0 was deleted"):
            bridge.poll_once()


class TestVhostBridgeFlood(RunningBridgeCase, unittest.TestCase):
    """64-byte floods (pktgen) each way through 64-entry rings, where the interrupt
    moderation is busiest (RX interrupts off while a TX ring is more than a quarter
    full): once a flood ends, nothing is left on any ring, every frame vhost took
    from the tap was forwarded and every frame offered to the tap arrived, and the
    path still carries a ping."""

    FRAMES = 30000
    OFFLOADS = False
    BRIDGE_OPTIONS = {"queue_size": 64}

    def setUp(self):
        self.ring_drops = 0
        super().setUp()

    def word(self, addr):
        """A u16 of ring memory, read without touching the ring object, which the
        bridge's thread owns (its used_pending() would mark a torn view broken)."""
        return struct.unpack_from("=H", self.bridge.arena.view, addr - self.bridge.arena.addr)[0]

    def settled(self):
        """No used entry waits on the tap RX ring; the devices used every published TX
        entry; every packet ring frame is back with the kernel (tp_status 0), and the NIC
        TX ring holds at most a quarter of its pool (the rest went back to the tap RX
        ring); the tap's own counters match the bridge's (the bridge created it)."""
        b = self.bridge
        rx_taken = b.tap_rxq.last_used_idx == self.word(b.tap_rxq.used_addr + 2)
        tx_sent = all(self.word(vq.avail_addr + 2) == self.word(vq.used_addr + 2)
                      for vq in (b.tap_txq, b.nic_txq))
        frames_back = not any(b.nic_ring.view[::b.nic_ring.frame_size].tobytes())
        return (rx_taken and tx_sent and frames_back and 4 * b.nic_txq.in_flight() <= b.queue_size
                and topo.counter("tap0", "tx_packets") == b.tap_stats.rx_packets
                and topo.counter("tap0", "rx_packets") + topo.counter("tap0", "rx_dropped")
                == b.tap_stats.tx_packets)

    def inward(self):
        """(frames the NIC took in, frames the bridge forwarded from it, frames it or
        the packet ring dropped), since the start."""
        stats = self.bridge.nic_stats
        self.ring_drops += self.nic.drops()           # read and cleared
        return (topo.counter("veth0", "rx_packets"), stats.rx_packets,
                stats.rx_dropped + self.ring_drops)

    def flood(self, inbound):
        """The flood's pace is the kernel's and this guest's, so how much of it the
        bridge could take is not asked; that it went round the rings many times,
        and that every frame is forwarded or counted as dropped, is."""
        stats = self.bridge.nic_stats
        before, out_before = self.inward(), stats.tx_packets
        topo.pktgen(inbound, "tap0", self.FRAMES, timeout=120)
        topo.wait_until(self.settled, 30, "every ring drained after the flood")

        def accounted():        # veth0 counts a frame before its backlog hands it on
            took, forwarded, dropped = (now - then for now, then in zip(self.inward(), before))
            return forwarded + dropped == took
        topo.wait_until(accounted, 10, "every frame the NIC took in forwarded or counted as "
                                       "dropped")
        moved = stats.rx_packets - before[1] if inbound else stats.tx_packets - out_before
        self.assertGreater(moved, 8 * self.bridge.queue_size, "the flood hardly reached the bridge")
        self.assertEqual(topo.ping(topo.OUTSIDE_IP), 3)

    def test_flood_from_outside(self):
        self.flood(True)

    def test_flood_from_the_kernel(self):
        self.flood(False)


class TestUnwindVhostBridge(UnwindCase, unittest.TestCase):
    """VhostBridge's bring-up (two devices, the packet ring) unwound at every step."""

    def test_device_missing_unwinds(self):
        before = self.snapshot()
        with self.assertRaises(FileNotFoundError):
            self.build(self.config(path="/nonexistent/vhost-net"))
        self.check_unwound(before, None)

    def test_ring_mapping_refused_unwinds(self):
        ring = vp.PacketRxRing(self.nic, 64, 1514)      # the socket's one receive ring
        before = self.snapshot()
        try:
            with self.assertRaisesRegex(vp.VhostPathError, "cannot map a packet receive ring"):
                self.build(self.config())
            self.assertEqual(self.snapshot(), before)
        finally:
            ring.close()


class TestUnwindVirtioUserPort(UnwindCase, unittest.TestCase):
    """A Bridge over a VirtioUserPort (--nic-io socket) unwound at every step."""
    NIC_IO = "socket"


class TestLinkLoss(LinkLossCase, unittest.TestCase):
    """NIC and tap lost under the defaults (VhostBridge)."""


class TestLifeCycle(LifeCycleCase, unittest.TestCase):
    """NIC life cycle and host changes with vhost-net both ways."""


class TestBusyPoll(BusyPollCase, unittest.TestCase):
    """--busy-poll with vhost-net both ways."""


class TestUdpGso(UdpGsoCase, unittest.TestCase):
    """UDP GSO through vhost-net both ways: one super-frame on 6.2+, segmented before."""


class TestExample(ExampleCase, unittest.TestCase):
    """The worked example on a VirtioUserPort (real vhost-net)."""


class TestHook(HookCase, unittest.TestCase):
    """Bridge hooks with a VirtioUserPort (real vhost-net)."""


class TestFilter(FilterCase, unittest.TestCase):
    """--filter on the packet ring (VhostBridge), on recvmmsg (--nic-io socket) and on
    two queue pairs' fanout sockets."""
    MODES = ((), ("--nic-io", "socket"), ("--queues", "2"))


class TestRingBroken(OutsideCase, unittest.TestCase):
    """A device that publishes an impossible used index stops the bridge with a
    RingBrokenError that says what it saw; close() then leaves nothing."""

    def test_a_broken_ring_stops_the_bridge(self):
        import threading
        fds_before = sorted(os.listdir("/proc/self/fd"))
        nic = vp.PacketSocket("veth0")
        self.addCleanup(nic.close)
        bridge = vp.VhostBridge(nic, queue_size=64)
        errors = []

        def run():
            try:
                bridge.run()
            except vp.RingBrokenError as e:
                errors.append(e)
        worker = threading.Thread(target=run)
        worker.start()
        try:
            # Play the device: used->idx 200 entries on, on a 64-entry ring.
            struct.pack_into("=H", bridge.arena.view, bridge.tap_rxq.used_addr + 2
                             - bridge.arena.addr, 200)
            os.write(bridge.callfd, (1).to_bytes(8, sys.byteorder))
            worker.join(30)
        finally:
            if worker.is_alive():
                bridge.stop()
                worker.join(30)
        self.assertEqual([str(e) for e in errors], [
            "virtqueue broken: used->idx moved by 200 entries, more than the ring's 64"])
        self.assertTrue(bridge.tap_rxq.broken)
        bridge.close()
        nic.close()
        self.assertNotIn("tap0", topo.interfaces())
        topo.wait_until(lambda: not topo.vhost_threads(os.getpid()), 10, "vhost threads exit")
        self.assertEqual(sorted(os.listdir("/proc/self/fd")), fds_before, "fd leaked")


class TestOldestAndNewestPython(OutsideCase, unittest.TestCase):
    """The tool copied onto an older or a newer system: started under the oldest and
    the newest CPython found (tests/run.py's pythons()), it forwards a sha256-checked
    transfer both ways and stops cleanly."""

    def test_transfers_both_ways(self):
        from tests.run import pythons
        found = pythons()
        for version in sorted({min(found), max(found)}):
            with self.subTest(python=version):
                tool = topo.Tool("--iface", "veth0", python=found[version])
                self.addCleanup(tool.kill)
                topo.configure_tap("tap0")
                # Each tap0 has a new random MAC: the kernel side's ARP request tells
                # the outside, whose entry for 1.1.1.1 still names the last one.
                self.assertEqual(topo.ping(topo.OUTSIDE_IP), 3)
                for direction in ("in", "out"):
                    sent, received = topo.tcp_transfer(direction, 4 * MB)
                    self.assertEqual(sent, received, direction)
                    self.assertTrue(sent.startswith(f"{4 * MB} "), direction)
                rc, _, err = tool.stop()
                self.assertEqual(rc, 0, err)


class TestTapNapi(OutsideCase, unittest.TestCase):
    """The tap is made with IFF_NAPI, so the MTU-sized segments of a TCP stream
    inwards reach the kernel merged by GRO: frames over the wire's largest
    (1514 bytes) are seen arriving on tap0."""

    OFFLOADS = False        # the outside sends nothing over 1514 bytes

    def test_an_inward_stream_is_merged_by_gro(self):
        import threading
        tool = topo.Tool("--iface", "veth0", "--address", f"{topo.KERNEL_IP}/24", "-v")
        self.addCleanup(tool.kill)
        largest, done = [0], threading.Event()
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(vp.ETH_P_ALL)) as s:
            s.bind(("tap0", 0))

            def watch():                    # what arrives on tap0 (PACKET_HOST)
                while not done.is_set():
                    if select.select([s], [], [], 0.2)[0]:
                        frame, addr = s.recvfrom(1 << 16)
                        if addr[2] == socket.PACKET_HOST:
                            largest[0] = max(largest[0], len(frame))
            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                sent, received = topo.tcp_transfer("in", 8 * MB)
            finally:
                done.set()
                watcher.join(10)
        self.assertEqual(sent, received)
        self.assertGreater(largest[0], 1514, "no frame merged by GRO on tap0")
        rc, _, err = tool.stop()
        self.assertEqual(rc, 0, err)
        self.assertIn("(NAPI, GRO on what is written to it)", err)


class TestBridgeDefaults(BridgeCase, unittest.TestCase):
    VLANS = True
    """The defaults (LRO and rx checksum on) with veth's defaults: 64 KB frames both ways."""
    LRO = True


class TestBridgeNoOffloadOutsideTso(BridgeCase, unittest.TestCase):
    VLANS = True
    """No offload towards us; the outside sends TSO super-frames with partial checksums."""
    ARGS = ("--no-lro", "--no-rx-cksum")


class TestBridgeOffloadsOff(BridgeCase, unittest.TestCase):
    VLANS = True
    """No offload anywhere: ethtool -K veth1 tx off, MTU-sized frames, full checksums."""
    ARGS = ("--no-lro", "--no-rx-cksum")
    OFFLOADS = False


class TestBridgeRxCksum(BridgeCase, unittest.TestCase):
    VLANS = True
    """--rx-cksum: the kernel hands over partial checksums, completed on the way out."""
    ARGS = ("--rx-cksum", "--no-lro")
    OFFLOADS = False


class TestBridgeLro(BridgeCase, unittest.TestCase):
    VLANS = True
    """--lro with 1024-entry rings: 64 KB segments from the kernel, outside a plain wire."""
    ARGS = ("--lro", "--queue-size", "1024")
    OFFLOADS = False
    LRO = True


class TestBridgeLroOutsideTsoGro(BridgeCase, unittest.TestCase):
    VLANS = True
    """--lro with the outside's TSO and GRO on: 64 KB frames both ways."""
    ARGS = ("--lro",)
    GRO = True
    LRO = True


class TestBridgeSocketNic(BridgeCase, unittest.TestCase):
    VLANS = True
    """--nic-io socket (recvmmsg/sendmmsg here, MRG_RXBUF) with the defaults."""
    ARGS = ("--nic-io", "socket")
    LRO = True


class TestBridgeSocketNicOffloadsOff(BridgeCase, unittest.TestCase):
    VLANS = True
    """--nic-io socket with no offload anywhere."""
    ARGS = ("--nic-io", "socket", "--no-lro", "--no-rx-cksum")
    OFFLOADS = False


class TestBridgeReadWrite(BridgeCase, unittest.TestCase):
    VLANS = True
    """--tap-io read-write, the fallback, chosen explicitly where vhost-net exists."""
    TAP_IO = "read-write"
    LRO = True


class TestShutdown(ShutdownCase, unittest.TestCase):
    pass


class TestShutdownSocketNic(ShutdownCase, unittest.TestCase):
    ARGS = ("--nic-io", "socket")


class TestDemo(DemoCase, unittest.TestCase):
    THROUGH_LINE = "through /dev/vhost-net, queue size 256, bridging vpdemo0 <-> tap0"


class TestCliWithVhost(OutsideCase, unittest.TestCase):
    """Command-line behaviour that needs a real /dev/vhost-net."""

    def test_auto_tap_io_picks_vhost_net(self):
        tool = topo.Tool("--iface", "veth0")
        rc, _, err = tool.stop()
        self.assertEqual(rc, 0, err)
        self.assertIn("through /dev/vhost-net", tool.first_line)
        self.assertNotIn("warning", err)

    def test_non_root_fails_clearly(self):
        with topo.readable_copy() as tool:         # the checkout may be root's alone
            r = topo.run([topo.unprivileged_python(), tool, "--iface", "veth0"], timeout=60,
                         preexec_fn=topo.as_user(topo.NOBODY))
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stderr.strip().splitlines(),
                         ["vhostpath: permission denied: run as root (needs CAP_NET_ADMIN "
                          "and CAP_NET_RAW to create the tap and open a packet socket)"])
        self.assertNotIn("tap0", topo.interfaces())

    def test_address_on_nic_warns(self):
        topo.sh("ip", "addr", "add", "1.1.1.9/24", "dev", "veth0")
        tool = topo.Tool("--iface", "veth0")
        rc, _, err = tool.stop()
        self.assertEqual(rc, 0)
        self.assertIn("warning: veth0 still has IPv4 address 1.1.1.9", err)

    def test_existing_tap_in_use_fails_clearly(self):
        with vp.Tap("vpbusy0"):
            r = topo.run([*topo.tool_command(), "--iface", "veth0", "--tap", "vpbusy0"],
                         timeout=60)
        self.assertEqual(r.returncode, 1)
        self.assertIn("vpbusy0 is already in use", r.stderr)

    def test_verbose_lro_features_tap_offloads_and_stats(self):
        tool = topo.Tool("--iface", "veth0", "-v", "--lro", "--stats", "0.2")
        line = tool.readline(timeout=30)
        self.assertRegex(line or "", r"veth0: rx \d+ pkts .* \| tap0: rx \d+ pkts")
        rc, _, err = tool.stop()
        self.assertEqual(rc, 0, err)
        self.assertIn("NIC side: in through the packet socket's receive ring on veth0 (2048 x 2048 "
                      "bytes), out through a second vhost-net device, backend the packet socket",
                      err)
        self.assertRegex(err, r"negotiated 0x[0-9a-f]+ \(CSUM GUEST_CSUM GUEST_TSO4 GUEST_TSO6 "
                              r"HOST_TSO4 HOST_TSO6 EVENT_IDX\); vhost-net got 0x20000000,")
        self.assertIn("virtio-net header 10 bytes", err)
        self.assertIn("tap offloads 0x7 (CSUM TSO4 TSO6)", err)
        self.assertIn("tap RX: read by this process while no frame is in flight (the vring "
                      "unbound), by the tap's vhost worker from a burst until 50 ms without one",
                      err)

    def test_verbose_socket_nic_shows_mergeable_buffers(self):
        tool = topo.Tool("--iface", "veth0", "-v", "--nic-io", "socket")
        rc, _, err = tool.stop()
        self.assertEqual(rc, 0, err)
        self.assertIn("NIC side: recvmmsg/sendmmsg on the packet socket on veth0", err)
        self.assertRegex(err, r"negotiated 0x[0-9a-f]+ \(CSUM GUEST_CSUM GUEST_TSO4 GUEST_TSO6 "
                              r"HOST_TSO4 HOST_TSO6 MRG_RXBUF\)")
        self.assertIn("virtio-net header 12 bytes", err)

    def test_verbose_and_periodic_stats(self):
        tool = topo.Tool("--iface", "veth0", "-v", "--stats", "0.2", "--mac",
                         "02:00:00:00:00:07", "--no-rx-cksum", "--nic-io", "socket")
        with open("/sys/class/net/tap0/address") as f:
            self.assertEqual(f.read().strip(), "02:00:00:00:00:07")
        line = tool.readline(timeout=30)
        self.assertRegex(line or "", r"veth0: rx \d+ pkts .* \| tap0: rx \d+ pkts")
        rc, out, err = tool.stop()
        self.assertEqual(rc, 0, err)
        self.assertIn("vhost-net got 0x8000", err)
        self.assertIn("header 12 bytes", err)
        self.assertIn("tap offloads 0x0 (none)", err)


if __name__ == "__main__":
    unittest.main()
