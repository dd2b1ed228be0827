"""Host tier: runs on any Linux host as root, without vhost-net.

ABI cross-check against the system's uapi headers, tap creation and kernel
naming, the NIC's packet receive ring, every command-line error, and the tool
end to end with --tap-io read-write.
"""

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import vhostpath as vp
from tests import topo
from tests.cases import (BridgeCase, BusyPollCase, DemoCase, ExampleCase, FilterCase, HookCase,
                         LifeCycleCase, LinkLossCase, OutsideCase, PersistentQueuesCase,
                         QueuesCase, QueuesShutdownCase, ShutdownCase, UdpGsoCase, UnwindCase,
                         check_closed_port)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (C expression, Python value) pairs checked against the headers.
IOCTLS = ["VHOST_GET_FEATURES", "VHOST_SET_FEATURES", "VHOST_SET_OWNER", "VHOST_SET_MEM_TABLE",
          "VHOST_SET_VRING_NUM", "VHOST_SET_VRING_ADDR", "VHOST_SET_VRING_BASE",
          "VHOST_GET_VRING_BASE", "VHOST_SET_VRING_KICK", "VHOST_SET_VRING_CALL",
          "VHOST_NET_SET_BACKEND", "TUNSETIFF", "TUNGETFEATURES", "TUNSETOFFLOAD", "TUNGETIFF",
          "TUNSETSNDBUF", "TUNGETVNETHDRSZ", "TUNSETVNETHDRSZ", "TUNSETCARRIER",
          "VHOST_SET_VRING_BUSYLOOP_TIMEOUT", "VHOST_GET_VRING_BUSYLOOP_TIMEOUT"]
CONSTANTS = ["VIRTIO_NET_F_CSUM", "VIRTIO_NET_F_GUEST_CSUM", "VIRTIO_NET_F_GUEST_TSO4",
             "VIRTIO_NET_F_GUEST_TSO6", "VIRTIO_NET_F_HOST_TSO4", "VIRTIO_NET_F_HOST_TSO6", "VIRTIO_NET_F_MRG_RXBUF", "VIRTIO_F_NOTIFY_ON_EMPTY",
             "VIRTIO_F_ANY_LAYOUT", "VIRTIO_RING_F_INDIRECT_DESC", "VIRTIO_RING_F_EVENT_IDX",
             "VIRTIO_F_VERSION_1", "VIRTIO_F_ACCESS_PLATFORM", "VRING_DESC_F_NEXT",
             "VRING_DESC_F_WRITE", "VRING_AVAIL_F_NO_INTERRUPT", "VRING_USED_F_NO_NOTIFY",
             "VIRTIO_NET_HDR_F_NEEDS_CSUM", "VIRTIO_NET_HDR_F_DATA_VALID",
             "VIRTIO_NET_HDR_GSO_NONE", "VIRTIO_NET_HDR_GSO_TCPV4", "VIRTIO_NET_HDR_GSO_UDP",
             "VIRTIO_NET_HDR_GSO_TCPV6", "VHOST_VIRTIO", "VHOST_FILE_UNBIND", "IFF_TAP", "IFF_NAPI",
             "IFF_MULTI_QUEUE", "IFF_NO_PI", "IFF_VNET_HDR", "TUN_F_CSUM", "TUN_F_TSO4",
             "TUN_F_TSO6", "SIOCGIFADDR", "SIOCSIFHWADDR", "ARPHRD_ETHER", "IFNAMSIZ",
             "SOL_PACKET", "ETH_P_ALL", "ETH_HLEN", "PACKET_ADD_MEMBERSHIP", "PACKET_MR_PROMISC",
             "PACKET_STATISTICS", "PACKET_VNET_HDR", "PACKET_RX_RING", "PACKET_COPY_THRESH",
             "PACKET_VERSION", "TPACKET_V1", "TPACKET_V2", "TPACKET_ALIGNMENT", "TPACKET2_HDRLEN",
             "TP_STATUS_KERNEL", "TP_STATUS_USER", "TP_STATUS_COPY", "TP_STATUS_VLAN_VALID",
             "TP_STATUS_VLAN_TPID_VALID", "ETH_P_8021Q", "ETH_ALEN", "PACKET_AUXDATA",
             "PACKET_IGNORE_OUTGOING", "PACKET_OUTGOING", "SO_ATTACH_FILTER", "SO_RCVBUFFORCE",
             "BPF_LD", "BPF_JMP", "BPF_RET", "BPF_W", "BPF_ABS", "BPF_JEQ", "BPF_K",
             "SKF_AD_OFF", "SKF_AD_PKTTYPE", "EFD_CLOEXEC", "EFD_NONBLOCK",
             "CAP_NET_ADMIN", "CAP_NET_RAW", "MADV_NOHUGEPAGE", "AF_PACKET", "NETLINK_ROUTE", "RTMGRP_LINK",
             "NLMSG_ERROR", "NLM_F_REQUEST", "NLM_F_ACK", "NLM_F_EXCL", "NLM_F_CREATE",
             "RTM_NEWLINK", "RTM_DELLINK", "RTM_GETLINK", "RTM_NEWADDR", "IFLA_ADDRESS",
             "IFLA_IFNAME", "IFLA_MTU", "IFLA_OPERSTATE", "IFLA_NET_NS_FD", "IFA_ADDRESS",
             "IFA_LOCAL", "NLA_F_NESTED", "NLA_F_NET_BYTEORDER", "NLA_TYPE_MASK", "IF_OPER_UNKNOWN", "IF_OPER_UP", "IFF_UP"]
STRUCTS = {
    "vhost_vring_state": "struct vhost_vring_state",
    "vhost_vring_file": "struct vhost_vring_file",
    "vhost_vring_addr": "struct vhost_vring_addr",
    "vhost_memory_region": "struct vhost_memory_region",
    "vhost_memory": "struct vhost_memory",
    "vring_desc": "struct vring_desc",
    "vring_avail": "struct vring_avail",
    "vring_used_elem": "struct vring_used_elem",
    "vring_used": "struct vring_used",
    "virtio_net_hdr": "struct virtio_net_hdr",
    "virtio_net_hdr_mrg_rxbuf": "struct virtio_net_hdr_mrg_rxbuf",
    "packet_mreq": "struct packet_mreq",
    "tpacket_stats": "struct tpacket_stats",
    "tpacket_req": "struct tpacket_req",
    "tpacket2_hdr": "struct tpacket2_hdr",
    "tpacket_auxdata": "struct tpacket_auxdata",
    "cmsghdr": "struct cmsghdr",
    "sock_filter": "struct sock_filter",
    "sock_fprog": "struct sock_fprog",
    "nlmsghdr": "struct nlmsghdr",
    "ifinfomsg": "struct ifinfomsg",
    "ifaddrmsg": "struct ifaddrmsg",
    "rtattr": "struct rtattr",
}


def _abi_program():
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <sys/socket.h>",
             "#include <sys/eventfd.h>", "#include <sys/mman.h>",
             "#include <linux/if.h>", "#include <linux/if_arp.h>",
             "#include <linux/if_ether.h>", "#include <linux/if_packet.h>",
             "#include <linux/if_tun.h>", "#include <linux/sockios.h>",
             "#include <linux/capability.h>", "#include <linux/vhost.h>",
             "#include <linux/virtio_config.h>", "#include <linux/virtio_ring.h>",
             "#include <linux/virtio_net.h>", "#include <linux/filter.h>",
             "#include <linux/netlink.h>", "#include <linux/rtnetlink.h>",
             "#include <linux/if_link.h>", "#include <linux/if_addr.h>",
             "int main(void) {"]
    for name in IOCTLS + CONSTANTS:
        lines.append(f'  printf("{name} %lld\\n", (long long)({name}));')
    for py, c in STRUCTS.items():
        lines.append(f'  printf("sizeof {py} %zu\\n", sizeof({c}));')
        for field, *_ in getattr(vp, py)._fields_:
            lines.append(f'  printf("offsetof {py}.{field} %zu\\n", offsetof({c}, {field}));')
    lines.append('  printf("sizeof ifreq %zu\\n", sizeof(struct ifreq));')
    lines.append('  printf("offsetof ifreq.ifr_flags %zu\\n", offsetof(struct ifreq, ifr_flags));')
    lines.append("  return 0; }")
    return "\n".join(lines) + "\n"


class TestABI(unittest.TestCase):
    """Every ioctl number, constant, struct size and field offset against the C headers."""

    @classmethod
    def setUpClass(cls):
        if not shutil.which("gcc") or not os.path.exists("/usr/include/linux/vhost.h"):
            raise unittest.SkipTest("gcc or the Linux uapi headers are not installed")
        with tempfile.TemporaryDirectory() as tmp:
            src, exe = os.path.join(tmp, "abi.c"), os.path.join(tmp, "abi")
            with open(src, "w") as f:
                f.write(_abi_program())
            subprocess.run(["gcc", "-o", exe, src], check=True)
            out = topo.run([exe], check=True).stdout
        cls.c = dict(line.rsplit(" ", 1) for line in out.splitlines())

    def test_ioctl_numbers_and_constants(self):
        for name in IOCTLS + CONSTANTS:
            with self.subTest(name=name):
                self.assertEqual(getattr(vp, name), int(self.c[name]) & 0xFFFFFFFF
                                 if name in IOCTLS else int(self.c[name]))

    def test_struct_layouts(self):
        for py in STRUCTS:
            cls = getattr(vp, py)
            with self.subTest(struct=py):
                self.assertEqual(ctypes.sizeof(cls), int(self.c[f"sizeof {py}"]))
                for field, *_ in cls._fields_:
                    self.assertEqual(getattr(cls, field).offset,
                                     int(self.c[f"offsetof {py}.{field}"]), field)
        self.assertEqual(ctypes.sizeof(vp.ifreq), int(self.c["sizeof ifreq"]))
        self.assertEqual(vp.ifreq.ifr_ifru.offset, int(self.c["offsetof ifreq.ifr_flags"]))

    def test_pinned_values(self):
        # Values from the reference tables, so a wrong helper cannot agree with itself.
        self.assertEqual(vp.VHOST_SET_VRING_ADDR, 0x4028AF11)
        self.assertEqual(vp.VHOST_GET_VRING_BASE, 0xC008AF12)
        self.assertEqual(vp.VHOST_NET_SET_BACKEND, 0x4008AF30)
        self.assertEqual(vp.TUNSETIFF, 0x400454CA)
        self.assertEqual(vp.TUNSETVNETHDRSZ, 0x400454D8)


def _interfaces():
    return set(os.listdir("/sys/class/net"))


class TestArena(unittest.TestCase):
    def test_no_huge_pages(self):
        """The arena is madvised MADV_NOHUGEPAGE ("nh" in its VmFlags): a first write
        into it never waits for a 2 MB page to be zeroed."""
        arena = vp.Arena(8 << 20)
        self.addCleanup(arena.close)
        start = f"{arena.addr:x}-"
        with open("/proc/self/smaps") as f:
            lines = iter(f.read().splitlines())
        for line in lines:
            if line.startswith(start):
                break
        else:
            self.fail("the arena is not in /proc/self/smaps")
        flags = next(line for line in lines if line.startswith("VmFlags:"))
        if os.path.exists("/sys/kernel/mm/transparent_hugepage"):
            self.assertIn(" nh", flags)


class TestTap(unittest.TestCase):
    def test_kernel_names_taps_from_template(self):
        before = _interfaces()
        with vp.Tap("tap%d") as a, vp.Tap("tap%d") as b:
            self.assertRegex(a.name, r"^tap\d+$")
            self.assertNotIn(a.name, before)
            self.assertEqual(int(b.name[3:]), int(a.name[3:]) + 1)
            with open(f"/sys/class/net/{a.name}/tun_flags") as f:
                flags = int(f.read(), 16)
            # IFF_NAPI where the kernel has it (4.15).
            napi = vp.IFF_NAPI if topo.kernel_at_least(4, 15) else 0
            self.assertEqual(flags & 0xFFFF, vp.IFF_TAP | vp.IFF_NO_PI | vp.IFF_VNET_HDR | napi)
            self.assertEqual(a.flags() & 0x7FFF, vp.IFF_TAP | vp.IFF_NO_PI | vp.IFF_VNET_HDR | napi)
            name = a.name
        self.assertNotIn(name, _interfaces(), "tap left behind after close")

    def test_named_tap_and_settings(self):
        with vp.Tap("vptest%d") as t:
            self.assertRegex(t.name, r"^vptest\d+$")
            self.assertEqual(t.vnet_hdr_sz(), 10)
            t.set_vnet_hdr_sz(12)
            self.assertEqual(t.vnet_hdr_sz(), 12)
            t.set_sndbuf(vp.INT_MAX)
            t.set_offload(vp.TUN_F_CSUM | vp.TUN_F_TSO4 | vp.TUN_F_TSO6)
            with self.assertRaises(OSError) as cm:
                t.set_offload(vp.TUN_F_TSO4)        # TSO without CSUM: EINVAL
            self.assertEqual(cm.exception.errno, errno.EINVAL)
            self.assertIn("TUNSETOFFLOAD", str(cm.exception))
            self.assertIn(t.name, str(cm.exception))
            t.set_mac(b"\x02\x00\x00\x12\x34\x56")
            with open(f"/sys/class/net/{t.name}/address") as f:
                self.assertEqual(f.read().strip(), "02:00:00:12:34:56")

    def test_name_follows_a_rename(self):
        """The name is asked through the fd: a rename is followed (the index too, if
        first asked after it), and once closed the last name known stays."""
        with vp.Tap("vpold0") as t:
            self.addCleanup(topo.sh, "ip", "link", "del", "vpnew0", check=False)
            topo.sh("ip", "link", "set", "vpold0", "name", "vpnew0")
            self.assertEqual(t.name, "vpnew0")
            self.assertEqual(t.index(), socket.if_nametoindex("vpnew0"))
            t.set_up()
            self.assertIn("UP", topo.sh("ip", "-o", "link", "show", "vpnew0"))
        self.assertEqual(t.name, "vpnew0")
        self.assertNotIn("vpnew0", _interfaces(), "tap left behind after close")

    def test_bad_names_rejected(self):
        for bad in ("", "x" * 16, "a/b", "a b"):
            with self.subTest(name=bad), self.assertRaises(vp.VhostPathError):
                vp.Tap(bad)


class TestTapRecord(unittest.TestCase):
    """A persistent tap's record (TapFound.keep) as restore_tap reads it: a tap
    changed under a dead owner's record is put back and the record removed; a
    running owner's record is refused and kept; a torn or foreign record, or one
    of a tap since removed, is only removed."""

    NAME = "vprec0"

    def setUp(self):
        self.path = os.path.join(vp.TAP_STATE_DIR, f"{self.NAME}.json")
        self.addCleanup(lambda: os.path.exists(self.path) and os.unlink(self.path))

    def write(self, text):
        os.makedirs(vp.TAP_STATE_DIR, exist_ok=True)
        with open(self.path, "w") as f:
            f.write(text)

    def orphan(self):
        """The record's owner made a process that has exited (pid 1 at another start)."""
        import json
        with open(self.path) as f:
            record = json.load(f)
        self.write(json.dumps(dict(record, owner="1@0")))

    def test_put_back_under_a_dead_owner(self):
        found = topo.persistent_tap(self, self.NAME)
        vp.TapFound.read(self.NAME).keep(self.NAME)
        with self.assertRaises(vp.VhostPathError) as cm:
            vp.restore_tap(self.NAME)
        self.assertEqual(str(cm.exception), f"{self.NAME} is attached by vhostpath "
                                            f"(pid {os.getpid()}); stop it first")
        self.assertTrue(os.path.exists(self.path))
        topo.sh("ip", "link", "set", self.NAME, "mtu", "1500", "address", "02:00:00:00:00:98",
                "up")
        topo.sh("ip", "addr", "add", "10.8.8.1/24", "dev", self.NAME)
        self.assertNotEqual(topo.link_state(self.NAME), found)
        self.orphan()
        self.assertTrue(vp.restore_tap(self.NAME))
        self.assertEqual(topo.link_state(self.NAME), found)
        self.assertFalse(os.path.exists(self.path))
        self.assertFalse(vp.restore_tap(self.NAME))      # nothing left to put back

    def test_a_removed_tap_record_is_only_removed(self):
        topo.persistent_tap(self, self.NAME)
        vp.TapFound.read(self.NAME).keep(self.NAME)
        topo.sh("ip", "link", "del", self.NAME)
        self.orphan()
        self.assertFalse(vp.restore_tap(self.NAME))
        self.assertFalse(os.path.exists(self.path))

    def test_torn_and_foreign_records_are_removed(self):
        for text in ('{"owner": "1@0", "ifindex"', '{"owner": "1@0"}', '[1, 2]',
                     '{"owner": "1@0", "ifindex": 1, "mac": "zz", "mtu": 1500, "up": false, '
                     '"addresses": [], "sysctls": {}}'):
            with self.subTest(record=text):
                self.write(text)
                self.assertFalse(vp.restore_tap(self.NAME))
                self.assertFalse(os.path.exists(self.path))


class TestPacketRxRing(OutsideCase, unittest.TestCase):
    """The NIC's receive ring on a veth (MTU 4000, so that frames over a 2 KB slot
    come too): frames in ring order behind their virtio_net_hdr, big ones queued
    whole on the socket, drops while the ring is full, the socket as before once
    the ring is closed, and a VLAN tag reported beside its frame (in the slot, and
    in PACKET_AUXDATA of recvmmsg)."""

    OFFLOADS = False

    def setUp(self):
        super().setUp()
        for ns in (None, topo.NS):
            topo.sh("ip", "link", "set", "veth1" if ns else "veth0", "mtu", "4000", ns=ns)
        topo.configure_tap("veth0")             # the kernel answers the outside's pings
        self.nic = vp.PacketSocket("veth0")
        self.addCleanup(self.nic.close)

    def ping_in(self, count, size):
        topo.sh("ping", "-c", str(count), "-i", "0.2", "-s", str(size), topo.KERNEL_IP,
                ns=topo.NS, check=False)

    def test_twelve_byte_headers_moved_to_the_front(self):
        """With PACKET_VNET_HDR_SZ 12 (Linux 6.4) the kernel writes the 10-byte header
        right before the frame; front_headers (a batch) and front_header (one frame)
        make [virtio_net_hdr][num_buffers] of it, the frame untouched."""
        try:
            self.nic.set_hdr_len(12)
        except OSError as e:
            raise unittest.SkipTest(f"no PACKET_VNET_HDR_SZ on this kernel: {e}")
        ring = vp.PacketRxRing(self.nic, 64, 1518)
        self.addCleanup(ring.close)
        self.assertEqual(ring.mac_offset, 78)
        # From veth1 (outside), UDP frames whose checksum veth0 receives partial
        # (NEEDS_CSUM: a header that is not all zeros), veth1's offload on for that.
        topo.sh("ethtool", "-K", "veth1", "tx", "on", ns=topo.NS)
        udp = b"\x00\x09\x00\x09\x00\x12\x00\x00" + b"0123456789"
        ip = bytes.fromhex("4500001c00010000401100000101010201010101")
        frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp
        header = bytes([vp.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 0, 0, 34, 0, 6, 0])
        with vp.socket_in_netns(topo.NS, socket.AF_PACKET, socket.SOCK_RAW) as out:
            out.setsockopt(vp.SOL_PACKET, vp.PACKET_VNET_HDR, 1)
            out.bind(("veth1", 0))
            for _ in range(4):
                out.send(header + frame)
        slot = ring.frame_size

        def ours():
            n = ring.ready(0, 64)
            return [f for f in range(n) if ring.headers(f, 1)[3] == [78]
                    and bytes(ring.view[f * slot + 78:f * slot + 78 + len(frame)]) == frame]
        topo.wait_until(lambda: len(ours()) == 4, 10, "the frames in the ring")
        first, *_, last = ours()
        for f in (first, last):                                    # as the kernel wrote it
            self.assertEqual(bytes(ring.view[f * slot + 68:f * slot + 78]), header)
        ring.front_headers(first, 1)
        ring.front_header(last, 78)
        for f in (first, last):
            self.assertEqual(bytes(ring.view[f * slot + 66:f * slot + 76]), header, f)
            self.assertEqual(bytes(ring.view[f * slot + 78:f * slot + 78 + len(frame)]), frame)

    def test_frames_in_order_and_big_ones_whole(self):
        ring = vp.PacketRxRing(self.nic, 64, 1518)
        self.addCleanup(ring.close)
        self.assertEqual((ring.frame_size, ring.mac_offset), (2048, 76))
        addrs = ring.frame_addrs(66)            # where each frame's virtio_net_hdr starts
        self.assertEqual((len(addrs), addrs[1]), (64, ring.addr + 2048 + 66))
        addrs.release()
        self.ping_in(2, 3000)                   # 3028-byte echo requests: over a slot
        n = ring.ready(0, 64)
        status, tp_len, snaplen, mac = ring.headers(0, n)
        self.assertEqual(mac, [76] * n)
        big = [k for k in range(n) if status[k] & vp.TP_STATUS_COPY]
        self.assertEqual([tp_len[k] for k in big], [3042, 3042])
        for k in range(n):
            if k in big:
                self.assertEqual(snaplen[k], 2048 - 76)
                buf = bytearray(8192)
                nbytes, _, flags, _ = self.nic.sock.recvmsg_into([buf])
                self.assertEqual((nbytes, flags & vp.MSG_TRUNC), (10 + 3042, 0))
                self.assertEqual(buf[10 + 34], 8)           # ICMP echo request
            else:
                self.assertEqual(snaplen[k], tp_len[k])
            vnet_hdr, eth = (ring.view[k * 2048 + off:k * 2048 + off + size].tobytes()
                             for off, size in ((66, 10), (76, 14)))
            self.assertEqual(vnet_hdr[1], vp.VIRTIO_NET_HDR_GSO_NONE)
            self.assertIn(eth[12:14], (b"\x08\x00", b"\x08\x06", b"\x86\xdd"))  # IP, ARP, IPv6
        with self.assertRaises(BlockingIOError):        # nothing else was queued
            self.nic.sock.recv(1)
        ring.release(0, n)
        self.assertEqual(ring.ready(0, 64), 0)

    def test_ready_counts_past_its_first_window(self):
        """ready() looks at 16 frames past the first, then windows 4 times as large:
        the count is the same for any limit; whole() gives a usual frame's length
        and None for a tagged one (left to the batch path).  The ring is filled, so
        no frame can come in between (the outside's IPv6 may send some)."""
        ring = vp.PacketRxRing(self.nic, 128, 1518)
        self.addCleanup(ring.close)
        self.send_tagged(140, tag=b"")
        topo.wait_until(lambda: ring.ready(0, 128) == 128, 10, "a full ring")
        for start in (0, 1, 17, 81, 127):
            for limit in {1, 2, 16, 17, 18, 80, 128 - start}:
                if limit <= 128 - start:                    # ready() does not wrap
                    self.assertEqual(ring.ready(start, limit), limit, (start, limit))
        lengths = [ring.whole(f) for f in range(128)]
        self.assertNotIn(None, lengths)
        self.assertGreaterEqual(lengths.count(60), 120, lengths)   # the raw frames, as sent
        ring.release(0, 128)
        self.assertEqual(ring.ready(0, 128), 0)
        self.send_tagged(1)

        def tagged():
            status = ring.headers(0, ring.ready(0, 128))[0]
            return [f for f, st in enumerate(status) if st & vp.TP_STATUS_VLAN_VALID]
        topo.wait_until(tagged, 10, "the tagged frame")
        self.assertIsNone(ring.whole(tagged()[0]))

    def test_release_across_the_wrap_and_drops_when_full(self):
        ring = vp.PacketRxRing(self.nic, 8, 1518)
        self.addCleanup(ring.close)
        head = seen = 0
        while seen < 12:                        # round the ring and past its start
            self.ping_in(1, 56)
            n = ring.ready(head, 8 - head)
            self.assertGreater(n, 0, "no frame for a ping")
            ring.release(head, n)
            head, seen = (head + n) % 8, seen + n
        self.assertEqual(self.nic.drops(), 0)
        self.ping_in(10, 56)                    # 10 echo requests for 8 slots
        self.assertEqual(ring.ready(head, 8 - head) + ring.ready(0, head), 8)
        self.assertGreater(self.nic.drops(), 0)

    def send_tagged(self, count=1, tag=b"\x81\x00\x20\x64"):
        """Send ``count`` frames tagged 0x2064 (or as ``tag`` says) raw from the
        outside; return one as sent.  veth0's receive path takes the tag off
        (skb_vlan_untag) before packet sockets see it."""
        def mac(dev, ns=None):
            return bytes.fromhex(topo.sh("cat", f"/sys/class/net/{dev}/address",
                                         ns=ns).strip().replace(":", ""))
        sent = mac("veth0") + mac("veth1", topo.NS) + tag + b"\x88\xb5" + bytes(range(46))
        topo.sh(sys.executable, "-c", "import socket, sys; s = socket.socket(17, 3, 0); "
                "s.bind(('veth1', 0)); [s.send(bytes.fromhex(sys.argv[1])) for _ in range(int("
                "sys.argv[2]))]", sent.hex(), str(count), ns=topo.NS)
        return sent

    def test_tags_put_back_for_a_whole_batch(self):
        ring = vp.PacketRxRing(self.nic, 64, 1518)
        self.addCleanup(ring.close)
        sent = self.send_tagged(3)
        n = ring.ready(0, 64)
        status = ring.headers(0, n)[0]
        tagged = [k for k in range(n) if status[k] & vp.TP_STATUS_VLAN_VALID]
        self.assertEqual(len(tagged), 3)
        k = tagged[0]
        self.assertEqual(tagged, [k, k + 1, k + 2])         # sent back to back
        if k:                                               # a batch with an untagged frame
            self.assertFalse(ring.retag(k - 1, 4, 10))
        ring.view[(k + 2) * 2048 + 66] = vp.VIRTIO_NET_HDR_F_NEEDS_CSUM
        self.assertFalse(ring.retag(k, 3, 10))              # a header offset to move
        ring.view[(k + 2) * 2048 + 66] = vp.VIRTIO_NET_HDR_F_DATA_VALID     # no offsets
        self.assertTrue(ring.retag(k, 3, 10))
        for f in tagged:
            self.assertEqual(ring.view[f * 2048 + 62:f * 2048 + 72].tobytes(),
                             bytes([2 if f == k + 2 else 0]) + bytes(9))
            self.assertEqual(ring.view[f * 2048 + 72:f * 2048 + 72 + len(sent)].tobytes(), sent)

    def test_vlan_tag_reported_and_put_back(self):
        ring = vp.PacketRxRing(self.nic, 64, 1518)
        self.addCleanup(ring.close)
        sent = self.send_tagged()
        n = ring.ready(0, 64)
        status, tp_len, _, _ = ring.headers(0, n)
        k = next((k for k in range(n) if status[k] & vp.TP_STATUS_VLAN_VALID), None)
        self.assertIsNotNone(k, "no tagged frame in the ring")
        self.assertTrue(ring.vlan_tagged(0, n))
        self.assertFalse(ring.vlan_tagged(0, k))
        self.assertEqual(ring.vlan(k), (vp.ETH_P_8021Q, 0x2064))
        self.assertEqual(tp_len[k], len(sent) - 4)
        hdr = vp.insert_vlan_tag(ring.view, k * 2048 + 66, 10, *ring.vlan(k))
        self.assertEqual(hdr, k * 2048 + 62)
        self.assertEqual(ring.view[hdr + 10:hdr + 10 + len(sent)].tobytes(), sent)
        self.assertEqual(ring.view[hdr:hdr + 10].tobytes(), bytes(10))     # header as it was

    def test_vlan_tag_in_auxdata_of_recvmmsg(self):
        batch = vp._MsgBatch(4, 1, vp.PacketSocket.AUXDATA_SPACE)
        buf = bytearray(4 * 2048)
        anchor = ctypes.c_char.from_buffer(buf)
        for j in range(4):
            batch.set_iov(j, [(ctypes.addressof(anchor) + j * 2048, 2048)])
        sent = self.send_tagged()
        got = batch.recvmmsg(self.nic.fileno(), 4)
        tags = [vp.PacketSocket.auxdata_vlan(batch.control_data(j)) for j in range(got)]
        k = next((j for j in range(got) if buf[j * 2048 + 10 + 12:j * 2048 + 10 + 14]
                  == b"\x88\xb5"), None)
        self.assertIsNotNone(k, f"the tagged frame did not arrive ({got} frames)")
        self.assertEqual(tags[k], (vp.ETH_P_8021Q, 0x2064))
        self.assertEqual(batch.result(k)[1], 10 + len(sent) - 4)    # received untagged
        self.assertEqual([t for j, t in enumerate(tags) if j != k], [None] * (got - 1))

    def test_close_gives_the_socket_back(self):
        ring = vp.PacketRxRing(self.nic, 64, 9000 + 18)
        self.assertEqual(ring.frame_size, 3 * 4096)     # one whole-page slot per block
        ring.close()
        self.assertEqual(self.nic.sock.getsockopt(vp.SOL_PACKET, vp.PACKET_VERSION),
                         vp.TPACKET_V1)
        self.ping_in(1, 56)
        self.assertGreater(len(self.nic.sock.recv(65536)), 14)


class TestDropOutgoingFilter(OutsideCase, unittest.TestCase):
    """DROP_OUTGOING, PacketSocket's fallback where PACKET_IGNORE_OUTGOING is missing
    (Linux < 4.20): a packet socket with it sees what arrives on the NIC and nothing
    the host sends; one without it sees both."""

    OFFLOADS = False

    def kinds_seen(self, sock):
        """{sll_pkttype: frames} of what ``sock`` holds now."""
        seen = {}
        while True:
            try:
                _, addr = sock.recvfrom(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return seen
            seen[addr[2]] = seen.get(addr[2], 0) + 1

    def test_outgoing_frames_dropped_incoming_kept(self):
        topo.configure_tap("veth0")             # the kernel answers on the NIC itself
        socks = []
        for program in (None, vp.DROP_OUTGOING):
            # Protocol 0: the socket takes no frame before bind(), so none from any
            # interface gets in ahead of the filter (as PacketSocket opens its own).
            sock = socket.socket(vp.AF_PACKET, socket.SOCK_RAW, 0)
            self.addCleanup(sock.close)
            if program:
                vp.attach_filter(sock, program)
            sock.bind(("veth0", vp.ETH_P_ALL))
            socks.append(sock)
        self.assertEqual(topo.ping(topo.KERNEL_IP, ns=topo.NS), 3)
        plain, filtered = (self.kinds_seen(sock) for sock in socks)
        self.assertGreaterEqual(plain.get(vp.PACKET_OUTGOING, 0), 3, plain)   # the replies
        self.assertEqual(filtered.get(vp.PACKET_OUTGOING, 0), 0, filtered)
        self.assertGreaterEqual(filtered.get(socket.PACKET_HOST, 0), 3, filtered)


def _run_tool(*args, **kw):
    return topo.run([*topo.tool_command(), *args], timeout=60, **kw)


class TestCliErrors(unittest.TestCase):
    """Each error: exit status 1 and one clear line on stderr, nothing created."""

    def assertFails(self, result, *needles):
        self.assertEqual(result.returncode, 1, result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        for needle in needles:
            self.assertIn(needle, lines[0])
        self.assertTrue(lines[0].startswith("vhostpath: "), lines[0])

    def test_not_linux(self):
        code = ("import sys; sys.platform = 'darwin'; sys.path.insert(0, %r); "
                "import vhostpath; sys.exit(vhostpath.main(['--iface', 'lo']))" % ROOT)
        r = topo.run([sys.executable, "-c", code])
        self.assertFails(r, "Linux only", "darwin")

    def test_not_root(self):
        with topo.readable_copy() as tool:         # the checkout may be root's alone
            r = topo.run([topo.unprivileged_python(), tool, "--iface", "lo"], timeout=60,
                         preexec_fn=topo.as_user(topo.NOBODY))
        self.assertFails(r, "permission denied", "root", "CAP_NET_ADMIN")

    def test_vhost_net_missing(self):
        r = _run_tool("--iface", "lo", "--tap-io", "vhost-net", "--path",
                      "/nonexistent/vhost-net")
        self.assertFails(r, "/nonexistent/vhost-net does not exist", "modprobe vhost_net")

    def test_nic_io_vhost_net_needs_vhost_net(self):
        self.assertFails(_run_tool("--iface", "lo", "--tap-io", "read-write", "--nic-io",
                                   "vhost-net"), "--nic-io: vhost-net needs tap I/O vhost-net")
        self.assertFails(_run_tool("--iface", "lo", "--nic-io", "vhost-net", "--path",
                                   "/nonexistent"), "--nic-io vhost-net",
                         "/nonexistent does not exist")

    def test_vhost_busy_poll_needs_vhost_net(self):
        self.assertFails(_run_tool("--iface", "lo", "--tap-io", "read-write",
                                   "--vhost-busy-poll", "50"),
                         "--vhost-busy-poll: needs tap I/O vhost-net, not read-write")
        # --tap-io auto would fall back to read-write: refused, not ignored.
        self.assertFails(_run_tool("--iface", "lo", "--vhost-busy-poll", "50", "--path",
                                   "/nonexistent"), "--vhost-busy-poll: /nonexistent does not")
        self.assertFails(_run_tool("--iface", "lo", "--vhost-busy-poll", "-1", "--tap-io",
                                   "vhost-net", "--path", "/dev/null"),
                         "--vhost-busy-poll: must be from 0 (off) to 1000000 microseconds")

    def test_nic_missing(self):
        r = _run_tool("--iface", "nosuchnic0", "--path", "/dev/null")
        self.assertFails(r, "nosuchnic0", "no such network interface")

    def test_bad_queue_size(self):
        for bad in ("100", "0", "65536"):
            with self.subTest(size=bad):
                self.assertFails(_run_tool("--iface", "lo", "--queue-size", bad),
                                 "--queue-size", "power of two")
        self.assertFails(_run_tool("--iface", "lo", "--queue-size", "32"),
                         "--queue-size", "from 64 to 32768")

    def test_bad_tap_name(self):
        for bad in ("", "%d%d", "a b", "x" * 16, "vp%s"):
            with self.subTest(tap=bad):
                self.assertFails(_run_tool("--iface", "lo", "--tap", bad),
                                 "--tap", "neither an interface name nor a template")

    def test_demo_bad_byte_count(self):
        self.assertFails(_run_tool("demo", "--bytes", "-5"), "--bytes", "at least 1")

    def test_lro_without_rx_checksum(self):
        self.assertFails(_run_tool("--iface", "lo", "--lro", "--no-rx-cksum"),
                         "--lro: needs rx checksum")
        # --no-rx-cksum alone turns the default LRO off instead of failing.
        self.assertFails(_run_tool("--iface", "lo", "--no-rx-cksum", "--tap-io", "vhost-net",
                                   "--path", "/nonexistent"), "/nonexistent does not exist")

    def test_bad_mac(self):
        self.assertFails(_run_tool("--iface", "lo", "--mac", "zz:00"), "invalid MAC")
        self.assertFails(_run_tool("--iface", "lo", "--mac", "01:00:5e:00:00:01"), "unicast")

    def test_tap_name_taken_by_another_device(self):
        subprocess.run(["ip", "link", "add", "vptaken0", "type", "veth", "peer", "name",
                        "vptaken1"], check=True)
        try:
            r = _run_tool("--iface", "lo", "--path", "/dev/null", "--tap", "vptaken0")
            self.assertFails(r, "vptaken0", "not a tap")
        finally:
            subprocess.run(["ip", "link", "del", "vptaken0"], check=True)

    def test_tap_placement_refused(self):
        self.assertFails(_run_tool("--iface", "lo", "--netns", "vpnosuchns"),
                         "--netns vpnosuchns: no such network namespace", "ip netns add")
        self.assertFails(_run_tool("--iface", "lo", "--address", "10.0.0.1"),
                         "--address: '10.0.0.1' has no prefix length")
        self.assertFails(_run_tool("--iface", "lo", "--address", "10.0.0.1/24", "--address",
                                   "fe80::1/129"), "--address: 'fe80::1/129' is not")

    def test_cleanup_needs_root_and_a_link(self):
        with topo.readable_copy() as tool:
            r = topo.run([topo.unprivileged_python(), tool, "cleanup", "--iface", "lo"],
                         timeout=60, preexec_fn=topo.as_user(topo.NOBODY))
        self.assertFails(r, "permission denied", "root")
        self.assertFails(_run_tool("cleanup"),
                         "cleanup: name the NIC (--iface), the tap (--tap) or both")

    def test_bad_stats_period(self):
        for bad in ("0", "-1", "nan", "inf", "1e9", "0.001"):
            with self.subTest(stats=bad):
                self.assertFails(_run_tool("--iface", "lo", "--stats", bad),
                                 "--stats: the period must be from 0.1 to 86400 seconds")
        self.assertNotIn("tap0", topo.interfaces())

    def test_cleanup_takes_interface_names_only(self):
        """A name that is no interface name never becomes a path: nothing outside
        the record directory is read or removed."""
        with tempfile.NamedTemporaryFile(suffix=".json", dir="/tmp") as victim:
            victim.write(b'{"a": 1}')
            victim.flush()
            name = "../.." + victim.name[:-len(".json")]
            for option, bad in [(o, b) for o in ("--iface", "--tap")
                                for b in (name, "..", "a b", "")]:
                with self.subTest(option=option, name=bad):
                    self.assertFails(_run_tool("cleanup", option, bad),
                                     f"invalid interface name {bad!r}")
            self.assertTrue(os.path.exists(victim.name))

    def test_tap_same_as_nic(self):
        self.assertFails(_run_tool("--iface", "lo", "--path", "/dev/null", "--tap", "lo"),
                         "NIC itself")

    def test_help_touches_nothing(self):
        r = _run_tool("--help")
        self.assertEqual(r.returncode, 0)
        self.assertIn("--queue-size", r.stdout)


class TestReadWriteBridge(BridgeCase, unittest.TestCase):
    """--tap-io read-write end to end on this host: defaults (LRO), veth's offloads on."""
    TAP_IO = "read-write"
    LRO = True


class TestReadWriteBridgeNoOffload(BridgeCase, unittest.TestCase):
    """--tap-io read-write without offloads anywhere."""
    TAP_IO = "read-write"
    ARGS = ("--no-lro", "--no-rx-cksum")
    OFFLOADS = False


class TestReadWriteShutdown(ShutdownCase, unittest.TestCase):
    TAP_IO = "read-write"


class TestReadWriteDemo(DemoCase, unittest.TestCase):
    THROUGH_LINE = "through read()/write() on the tap, bridging vpdemo0 <-> tap0"

    @classmethod
    def setUpClass(cls):
        if os.path.exists("/dev/vhost-net"):
            raise unittest.SkipTest("this host has vhost-net: auto would not fall back")


class TestReadWriteQueues(QueuesCase, unittest.TestCase):
    TAP_IO = "read-write"
    QUEUES = 2
    IPERF_SECONDS = 1       # native speed: a second spreads the flows


class TestReadWritePersistentQueues(PersistentQueuesCase, unittest.TestCase):
    TAP_IO = "read-write"


class TestReadWriteQueuesShutdown(QueuesShutdownCase, unittest.TestCase):
    TAP_IO = "read-write"


class TestUnwindReadWrite(UnwindCase, unittest.TestCase):
    """A Bridge over a TapPort (--tap-io read-write) unwound at every step."""
    TAP_IO = "read-write"


class TestLinkLossReadWrite(LinkLossCase, unittest.TestCase):
    """NIC and tap lost under --tap-io read-write."""
    TAP_IO = "read-write"

    def test_nic_renamed(self):
        """The settings the tool changed go back on the NIC under its new name."""
        original = topo.nic_settings()
        self.check_gone(lambda: topo.sh("ip", "link", "set", "veth0", "name", "vpren0"),
                        "veth0 was renamed vpren0")
        try:
            self.assertEqual(topo.nic_settings("vpren0"), original)
            self.assertFalse(os.path.exists("/run/vhostpath/veth0.json"))
        finally:
            topo.sh("ip", "link", "del", "vpren0")

    def test_nic_moved_to_another_namespace(self):
        self.check_gone(lambda: topo.sh("ip", "link", "set", "veth0", "netns", topo.NS),
                        "veth0 was moved to another network namespace")


class TestLifeCycleReadWrite(LifeCycleCase, unittest.TestCase):
    """NIC life cycle and host changes with the tap read and written by the tool."""
    TAP_IO = "read-write"
    PACKET_RING = False


class TestBusyPollReadWrite(BusyPollCase, unittest.TestCase):
    TAP_IO = "read-write"


class TestUdpGsoReadWrite(UdpGsoCase, unittest.TestCase):
    TAP_IO = "read-write"
    PACKET_RING = False


class TestExampleReadWrite(ExampleCase, unittest.TestCase):
    TAP_IO = "read-write"


class TestHookReadWrite(HookCase, unittest.TestCase):
    TAP_IO = "read-write"


class TestFilterReadWrite(FilterCase, unittest.TestCase):
    """--filter with the tap read and written by the tool, one and two queue pairs."""
    TAP_IO = "read-write"
    MODES = ((), ("--queues", "2"))


class TestCarrierFallback(OutsideCase, unittest.TestCase):
    """A kernel that refuses TUNSETCARRIER (before Linux 5.0, EINVAL; injected here):
    the bridge runs, follows the MTU, and says the carrier cannot follow."""

    def test_carrier_refused_is_named(self):
        real = vp.Tap.set_carrier

        def refused(tap, on):
            raise OSError(errno.EINVAL, "TUNSETCARRIER on tap0: Invalid argument")
        vp.Tap.set_carrier = refused
        try:
            with contextlib.ExitStack() as stack:
                nic = vp.PacketSocket("veth0")
                stack.callback(nic.close)
                bridge = vp.open_bridge(vp.Config(tap_io="read-write"), nic, stack)
                self.assertFalse(bridge.carrier_follows)
                self.assertIn("tap0 follows veth0's MTU (1500) but not its carrier: "
                              "TUNSETCARRIER needs Linux 5.0", bridge.describe())
                with open("/sys/class/net/tap0/mtu") as f:
                    self.assertEqual(f.read().strip(), "1500")
        finally:
            vp.Tap.set_carrier = real


class TestStopDuringSetUp(OutsideCase, unittest.TestCase):
    """A stop signal while the tool sets up: it unwinds what it made so far."""

    def test_signal_as_the_nic_turns_quiet(self):
        """SIGTERM or SIGHUP the moment the NIC's settings change (the tap and the
        rest still to come): the settings go back, no record or tap is left."""
        original = topo.nic_settings()
        arp_ignore = "/proc/sys/net/ipv4/conf/veth0/arp_ignore"
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with self.subTest(signal=sig):
                with topo.popen([*topo.tool_command(), "--iface", "veth0",
                                 "--tap-io", "read-write"]) as proc:
                    deadline = time.monotonic() + 60
                    while proc.poll() is None and time.monotonic() < deadline:
                        with open(arp_ignore) as f:
                            if f.read().strip() == topo.QUIET["arp_ignore"]:
                                break
                    else:
                        self.fail("the NIC never turned quiet")
                    _, err = topo.interrupt(proc, sig, 60)
                self.assertIn(proc.returncode, (0, 1), err)
                self.assertEqual(topo.nic_settings(), original)
                self.assertFalse(os.path.exists("/run/vhostpath/veth0.json"))
                self.assertNotIn("tap0", topo.interfaces())


class TestPortTapKeyword(unittest.TestCase):
    def test_a_tap_name_as_the_tap_argument(self):
        """``tap`` of a port is an opened Tap, or the Config keyword of that name."""
        with vp.TapPort(tap="vpkw%d", tap_io="read-write") as port:
            self.assertTrue(port.tap.name.startswith("vpkw"), port.tap.name)
            self.assertIn(port.tap.name, topo.interfaces())
        self.assertNotIn(port.tap.name, topo.interfaces())


class TestClosed(OutsideCase, unittest.TestCase):
    """A closed object says so, and closing it again does nothing."""

    def test_port(self):
        port = vp.TapPort(tap_io="read-write")
        port.close()
        check_closed_port(self, port)

    def test_packet_socket(self):
        with vp.PacketSocket("veth0") as nic:
            self.assertEqual(nic.send_frames([bytes(60)]), 1)
        for call in (lambda: nic.send_frames([bytes(60)]), nic.recv_frames):
            with self.assertRaises(OSError) as cm:
                call()
            self.assertEqual(cm.exception.errno, errno.EBADF)
        self.assertEqual(nic.fileno(), -1)

    def test_bridge(self):
        with vp.PacketSocket("veth0") as nic, vp.TapPort(tap_io="read-write") as port:
            bridge = vp.Bridge(nic, port)
            bridge.close()
            with self.assertRaisesRegex(ValueError, r"^tap0: run\(\) after close\(\)$"):
                bridge.run()
            bridge.close()
        self.assertNotIn("tap0", topo.interfaces())


class TestQueuesErrors(OutsideCase, unittest.TestCase):
    def test_queue_count_out_of_range(self):
        for bad in ("0", "257"):
            with self.subTest(queues=bad):
                r = _run_tool("--iface", "lo", "--queues", bad)
                self.assertEqual(r.returncode, 1)
                self.assertIn("--queues: must be from 1 to 256", r.stderr)

    def test_existing_single_queue_tap(self):
        topo.sh("ip", "tuntap", "add", "vpsq0", "mode", "tap", "vnet_hdr")
        try:
            r = _run_tool("--iface", "veth0", "--tap-io", "read-write", "--tap", "vpsq0",
                          "--queues", "2")
        finally:
            topo.sh("ip", "tuntap", "del", "vpsq0", "mode", "tap")
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stderr.strip().splitlines(), [
            "vhostpath: vpsq0 is a single-queue tap: --queues 2 needs a multi-queue one "
            "('ip tuntap add vpsq0 mode tap multi_queue vnet_hdr') or a new tap"])


class TestAutoTapIoFallback(OutsideCase, unittest.TestCase):
    def test_missing_vhost_net_falls_back_to_read_write_with_a_warning(self):
        tool = topo.Tool("--iface", "veth0", "--path", "/nonexistent/vhost-net")
        rc, _, err = tool.stop()
        self.assertEqual(rc, 0, err)
        self.assertIn("through read()/write() on the tap", tool.first_line)
        self.assertIn("warning: /nonexistent/vhost-net does not exist: load the vhost-net "
                      "driver with 'modprobe vhost_net'. Falling back to --tap-io "
                      "read-write", err)


if __name__ == "__main__":
    unittest.main()
