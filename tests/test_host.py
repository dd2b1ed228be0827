"""Host tier: runs on any Linux host as root, without vhost-net.

ABI cross-check against the system's uapi headers, ring arithmetic and the
driver's checks of what a device publishes, tap creation and kernel naming,
and every command-line error.
"""

import array
import ctypes
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import types
import unittest

import vhostpath as vp
from tests import topo
from tests.cases import (BridgeCase, DemoCase, QueuesCase, QueuesShutdownCase,
                         ShutdownCase)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "vhostpath.py")

# (C expression, Python value) pairs checked against the headers.
IOCTLS = ["VHOST_GET_FEATURES", "VHOST_SET_FEATURES", "VHOST_SET_OWNER", "VHOST_SET_MEM_TABLE",
          "VHOST_SET_VRING_NUM", "VHOST_SET_VRING_ADDR", "VHOST_SET_VRING_BASE",
          "VHOST_GET_VRING_BASE", "VHOST_SET_VRING_KICK", "VHOST_SET_VRING_CALL",
          "VHOST_NET_SET_BACKEND", "TUNSETIFF", "TUNGETFEATURES", "TUNSETOFFLOAD", "TUNGETIFF",
          "TUNSETSNDBUF", "TUNGETVNETHDRSZ", "TUNSETVNETHDRSZ"]
CONSTANTS = ["VIRTIO_NET_F_CSUM", "VIRTIO_NET_F_GUEST_CSUM", "VIRTIO_NET_F_GUEST_TSO4",
             "VIRTIO_NET_F_GUEST_TSO6", "VIRTIO_NET_F_HOST_TSO4", "VIRTIO_NET_F_HOST_TSO6", "VIRTIO_NET_F_MRG_RXBUF", "VIRTIO_F_NOTIFY_ON_EMPTY",
             "VIRTIO_F_ANY_LAYOUT", "VIRTIO_RING_F_INDIRECT_DESC", "VIRTIO_RING_F_EVENT_IDX",
             "VIRTIO_F_VERSION_1", "VIRTIO_F_ACCESS_PLATFORM", "VRING_DESC_F_NEXT",
             "VRING_DESC_F_WRITE", "VRING_AVAIL_F_NO_INTERRUPT", "VRING_USED_F_NO_NOTIFY",
             "VIRTIO_NET_HDR_F_NEEDS_CSUM", "VIRTIO_NET_HDR_F_DATA_VALID",
             "VIRTIO_NET_HDR_GSO_NONE", "VIRTIO_NET_HDR_GSO_TCPV4", "VIRTIO_NET_HDR_GSO_UDP",
             "VIRTIO_NET_HDR_GSO_TCPV6", "VHOST_VIRTIO", "VHOST_FILE_UNBIND", "IFF_TAP",
             "IFF_MULTI_QUEUE", "IFF_NO_PI", "IFF_VNET_HDR", "TUN_F_CSUM", "TUN_F_TSO4",
             "TUN_F_TSO6", "SIOCGIFADDR", "SIOCSIFHWADDR", "ARPHRD_ETHER", "IFNAMSIZ",
             "SOL_PACKET", "ETH_P_ALL", "ETH_HLEN", "PACKET_ADD_MEMBERSHIP", "PACKET_MR_PROMISC",
             "PACKET_STATISTICS", "PACKET_VNET_HDR", "PACKET_RX_RING", "PACKET_COPY_THRESH",
             "PACKET_VERSION", "TPACKET_V1", "TPACKET_V2", "TPACKET_ALIGNMENT", "TPACKET2_HDRLEN",
             "TP_STATUS_KERNEL", "TP_STATUS_USER", "TP_STATUS_COPY", "TP_STATUS_VLAN_VALID",
             "TP_STATUS_VLAN_TPID_VALID", "ETH_P_8021Q", "ETH_ALEN", "PACKET_AUXDATA",
             "PACKET_IGNORE_OUTGOING",
             "CAP_NET_ADMIN", "CAP_NET_RAW", "AF_PACKET"]
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
}


def _abi_program():
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <sys/socket.h>",
             "#include <linux/if.h>", "#include <linux/if_arp.h>",
             "#include <linux/if_ether.h>", "#include <linux/if_packet.h>",
             "#include <linux/if_tun.h>", "#include <linux/sockios.h>",
             "#include <linux/capability.h>", "#include <linux/vhost.h>",
             "#include <linux/virtio_config.h>", "#include <linux/virtio_ring.h>",
             "#include <linux/virtio_net.h>",
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
            out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
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


class TestRingArithmetic(unittest.TestCase):
    def test_layout_matches_standard_sizes(self):
        self.assertEqual(vp.vring_layout(256), (0, 4096, 8192, 10246))
        self.assertEqual(vp.vring_layout(1024), (0, 16384, 20480, 28678))

    def test_layout_rejects_bad_sizes(self):
        for bad in (0, 3, 100, 65536, -4):
            with self.subTest(num=bad), self.assertRaises(ValueError):
                vp.vring_layout(bad)

    def test_vnet_hdr_len(self):
        self.assertEqual(vp.vnet_hdr_len(0), 10)
        self.assertEqual(vp.vnet_hdr_len(1 << vp.VIRTIO_NET_F_MRG_RXBUF), 12)
        self.assertEqual(vp.vnet_hdr_len(1 << vp.VIRTIO_F_VERSION_1), 12)

    def test_offload_features(self):
        tx = (1 << vp.VIRTIO_NET_F_CSUM | 1 << vp.VIRTIO_NET_F_HOST_TSO4
              | 1 << vp.VIRTIO_NET_F_HOST_TSO6)
        self.assertEqual(vp.offload_features(False, False), tx)
        self.assertEqual(vp.offload_features(True, False), tx | 1 << vp.VIRTIO_NET_F_GUEST_CSUM)
        lro = vp.offload_features(True, True)
        self.assertEqual(vp.feature_names(lro),
                         "CSUM GUEST_CSUM GUEST_TSO4 GUEST_TSO6 HOST_TSO4 HOST_TSO6")
        with self.assertRaisesRegex(vp.VhostPathError, "LRO needs rx checksum"):
            vp.offload_features(False, True)

    def test_tap_offloads(self):
        self.assertEqual(vp.tap_offloads(vp.offload_features(False, False)), 0)
        self.assertEqual(vp.tap_offloads(vp.offload_features(True, False)), vp.TUN_F_CSUM)
        self.assertEqual(vp.tap_offloads(vp.offload_features(True, True)),
                         vp.TUN_F_CSUM | vp.TUN_F_TSO4 | vp.TUN_F_TSO6)
        # TSO bits without GUEST_CSUM never reach the tap (it would refuse them).
        self.assertEqual(vp.tap_offloads(1 << vp.VIRTIO_NET_F_GUEST_TSO4), 0)

    def test_largest_frame_fits(self):
        # From the NIC: one buffer plus a spill area; from the kernel: merged RX buffers.
        self.assertGreaterEqual(vp.TX_BUF_SIZE + vp.SPILL_SIZE, 12 + vp.MAX_FRAME)
        self.assertGreaterEqual(vp.MAX_RX_BUFS * vp.RX_BUF_SIZE, 12 + vp.MAX_FRAME)
        self.assertLessEqual(vp.MAX_RX_BUFS, vp.MIN_QUEUE_SIZE)

    def test_full_barrier_runs(self):
        barrier = vp._full_barrier()
        self.assertTrue(barrier.available, "no fence on this CPU: kicks would be unconditional")
        barrier()


class TestUsedRingChecks(unittest.TestCase):
    """The driver validates what a device publishes.  The test plays a misbehaving
    device by writing the used ring in memory (no kernel involved).  Both ways of
    taking used entries are checked: one at a time (get_buf) and by runs (get_run)."""

    EVENT_IDX = False

    def setUp(self):
        self.num = 8
        self.rings = []
        self.vq = self.make()

    def make(self, device_writes=True):
        """A fresh ring (device-writable unless told) with descriptors 0-3 offered,
        256 bytes each."""
        _, _, used, size = vp.vring_layout(self.num)
        arena = vp.Arena(size + self.num * 256)
        vq = vp.SplitVirtqueue(arena, 0, size, self.num, 256, device_writes, kickfd=-1,
                               event_idx=self.EVENT_IDX)
        for desc_id in range(4):
            vq.add_buf(desc_id, 256)
        self.rings.append((arena, vq))
        self.arena, self.used = arena, used
        return vq

    def tearDown(self):
        for arena, vq in self.rings:
            vq.close()
            arena.close()

    def publish(self, *elems, idx=None, start=0):
        ring = self.arena.view[self.used:self.used + 4 + 8 * self.num].cast("I")
        hdr = self.arena.view[self.used:self.used + 4].cast("H")
        for k, (desc_id, length) in enumerate(elems):
            slot = (start + k) % self.num
            ring[1 + 2 * slot], ring[2 + 2 * slot] = desc_id, length
        hdr[1] = (start + len(elems) if idx is None else idx) & 0xFFFF
        ring.release()
        hdr.release()

    def check_broken(self, elems, message, batch_message=None):
        """Taking the entries ``elems`` breaks the ring with ``message``, one at a time
        (get_buf), and with ``batch_message`` by runs (get_run) unless None."""
        for take, expected in (("get_buf", message), ("get_run", batch_message)):
            if expected is None:
                continue
            vq = self.make()
            self.publish(*elems)
            with self.subTest(take), self.assertRaisesRegex(vp.RingBrokenError, expected):
                for _ in elems:
                    getattr(vq, take)()

    def test_good_entries_are_returned(self):
        self.publish((1, 100), (0, 256))       # out of order is allowed
        self.assertEqual(self.vq.used_pending(), 2)
        self.assertEqual(self.vq.get_buf(), (1, 100))
        self.assertEqual(self.vq.get_buf(), (0, 256))
        self.assertEqual(self.vq.used_pending(), 0)

    def runs(self, vq, **kw):
        """Every run get_run gives, as (first id, [lengths])."""
        out = []
        while run := vq.get_run(**kw):
            first, count, lengths = run
            self.assertEqual(len(lengths), count)
            out.append((first, lengths.tolist()))
        return out

    def test_runs_are_returned_across_the_ring_end(self):
        self.vq.last_used_idx = self.vq.avail_idx_shadow = 0xFFFE   # free-running: wraps too
        self.vq.add_bufs([6, 7, 0])
        self.assertEqual(self.vq.in_flight(), 3)
        self.publish((6, 60), (7, 70), (0, 80), start=0xFFFE)
        # Used slots 6, 7, then 0: the run of ids 6, 7 ends with the used ring.
        self.assertEqual(self.runs(self.vq), [(6, [60, 70]), (0, [80])])
        self.assertEqual(self.vq.last_used_idx, 1)
        self.assertIsNone(self.vq.get_run())

    def test_runs_end_where_ids_wrap_or_stop_following(self):
        vq = self.make()
        vq.last_used_idx = vq.avail_idx_shadow = 0
        vq.add_bufs([6, 7, 0, 1, 3, 2, 4])
        self.publish((6, 10), (7, 11), (0, 12), (1, 13), (3, 14), (2, 15), (4, 16))
        self.assertEqual(self.runs(vq), [(6, [10, 11]), (0, [12, 13]), (3, [14]), (2, [15]),
                                         (4, [16])])

    def test_add_bufs_fills_the_avail_ring_across_its_end(self):
        vq = self.make()
        vq.avail_idx_shadow = 6
        vq.add_bufs([5, 6, 7], [10, 20, 30])
        avail = self.arena.view[vq.avail_addr - self.arena.addr:][:4 + 2 * self.num].cast("H")
        self.assertEqual([avail[2 + 6], avail[2 + 7], avail[2 + 0]], [5, 6, 7])
        desc = (vp.vring_desc * self.num).from_buffer(self.arena.mm)
        self.assertEqual([desc[i].len for i in (5, 6, 7)], [10, 20, 30])
        self.assertEqual(vq.avail_idx_shadow, 9)
        vq.kick_prepare()                       # publishes avail->idx
        self.assertEqual(avail[1], 9)
        del desc
        avail.release()

    def test_runs_of_a_ring_the_device_reads_carry_no_lengths(self):
        vq = self.make(device_writes=False)
        self.publish((0, 0), (1, 1 << 31))      # vhost writes 0; nothing else is read either
        self.assertEqual(vq.get_run(), (0, 2, None))
        self.assertIsNone(vq.get_run())

    def test_bridge_gives_packet_ring_frames_back_only_in_ring_order(self):
        """VhostBridge._release: frames go back to the packet ring (16 frames, frame f
        is descriptor f % 8) in ring order; a tap TX ring that used them out of
        order is broken.  The bridge's other parts are plain stand-ins."""
        for used, released in (([6, 7, 0, 1], [(14, 4)]), ([6, 7, 1, 0], None)):
            vq = self.make(device_writes=False)
            vq.last_used_idx = vq.avail_idx_shadow = 6
            vq.add_bufs([6, 7, 0, 1])
            self.publish(*[(desc_id, 0) for desc_id in used], start=6)
            given = []
            ring = types.SimpleNamespace(frame_nr=16, release=lambda f, n: given.append((f, n)))
            bridge = types.SimpleNamespace(tap_txq=vq, nic_ring=ring, _nic_tail=14,
                                           queue_size=self.num)
            with self.subTest(used=used):
                if released is None:
                    with self.assertRaisesRegex(vp.RingBrokenError, "out of order"):
                        vp.VhostBridge._release(bridge)
                    self.assertTrue(vq.broken)
                else:
                    vp.VhostBridge._release(bridge)
                    self.assertEqual((given, bridge._nic_tail), (released, 2))

    def test_add_run_wraps_the_ids_and_the_avail_ring(self):
        vq = self.make()
        vq.kick_prepare()                   # descriptors 0-3 published: num_added 0
        vq.avail_idx_shadow = 7
        desc = (vp.vring_desc * self.num).from_buffer(self.arena.mm)
        avail = self.arena.view[vq.avail_addr - self.arena.addr:][:4 + 2 * self.num].cast("H")
        before = [desc[i].len for i in range(self.num)]
        lengths = memoryview(array.array("I", [11, 12, 13, 14]))
        vq.add_run(6, 4, lengths)           # ids 6, 7 | 0, 1; avail slots 7 | 0, 1, 2
        self.assertEqual([desc[i].len for i in (6, 7, 0, 1)], [11, 12, 13, 14])
        self.assertEqual([desc[i].len for i in (2, 3, 4, 5)], before[2:6])
        self.assertEqual([avail[2 + s] for s in (7, 0, 1, 2)], [6, 7, 0, 1])
        self.assertEqual((vq.avail_idx_shadow, vq.num_added), (11, 4))
        vq.add_run(2, 2)                    # whole buffers: lengths untouched
        self.assertEqual([desc[i].len for i in (2, 3)], before[2:4])
        self.assertEqual([avail[2 + s] for s in (3, 4)], [2, 3])
        vq.add_bufs([4, 2], [21, 22])       # any ids: one by one
        self.assertEqual([desc[i].len for i in (4, 2, 3)], [21, 22, before[3]])
        del desc
        avail.release()

    def test_set_addrs_wraps_at_the_table_end(self):
        vq = self.make()
        vq.set_addrs(6, memoryview(array.array("Q", [0x1000, 0x2000, 0x3000])))
        desc = (vp.vring_desc * self.num).from_buffer(self.arena.mm)
        self.assertEqual([desc[i].addr for i in (6, 7, 0)], [0x1000, 0x2000, 0x3000])
        self.assertEqual(desc[1].addr, vq.buf_addr(1))      # the rest untouched
        del desc

    def test_batch_length_below_minimum(self):
        self.publish((1, 9))
        with self.assertRaisesRegex(vp.RingBrokenError, "used len 9 is shorter than 10"):
            self.vq.get_run(min_len=10)

    def test_batch_more_used_than_offered(self):
        self.vq.avail_idx_shadow = self.vq.last_used_idx   # nothing in flight
        self.publish((1, 10))
        with self.assertRaisesRegex(vp.RingBrokenError, "1 used entries, but only 0 offered"):
            self.vq.get_run()

    def test_index_beyond_ring(self):
        self.publish(idx=self.num + 1)
        with self.assertRaisesRegex(vp.RingBrokenError, "more than the ring"):
            self.vq.used_pending()
        with self.assertRaisesRegex(vp.RingBrokenError, "broken"):   # sticky
            self.vq.used_pending()

    def test_id_out_of_range(self):
        self.check_broken([(self.num, 10)], f"used id {self.num}", f"used id {self.num}")

    def test_id_not_owned_by_device(self):
        self.check_broken([(5, 10)], "used id 5")   # descriptor 5 was never offered

    def test_id_published_twice(self):
        self.check_broken([(2, 10), (2, 10)], "used id 2")

    def test_length_beyond_buffer(self):
        self.check_broken([(3, 257)], "used len 257", "used len 257")

    def test_add_chain_links_descriptors(self):
        vq = vp.SplitVirtqueue(self.arena, 0, vp.vring_layout(self.num)[3], self.num, 256,
                               False, kickfd=-1)
        desc = (vp.vring_desc * self.num).from_buffer(self.arena.mm)
        ids = [vq.free.pop() for _ in range(3)]
        vq.add_chain(ids, 600)
        self.assertEqual([(desc[i].len, desc[i].flags) for i in ids],
                         [(256, vp.VRING_DESC_F_NEXT), (256, vp.VRING_DESC_F_NEXT), (88, 0)])
        self.assertEqual([desc[ids[0]].next, desc[ids[1]].next], ids[1:])
        self.assertEqual(vq.chains[ids[0]], ids)
        self.assertEqual(vq.owned[ids[0]], 600)
        del desc
        vq.close()

    def test_add_buf_then_kick_prepare_publishes(self):
        desc = (vp.vring_desc * self.num).from_buffer(self.arena.mm)
        avail = self.arena.view[16 * self.num:16 * self.num + 4 + 2 * self.num].cast("H")
        self.assertEqual([desc[i].len for i in range(4)], [256] * 4)
        self.assertEqual(desc[0].flags, vp.VRING_DESC_F_WRITE)
        self.assertEqual(desc[0].addr, self.arena.addr + vp.vring_layout(self.num)[3])
        self.assertEqual(list(avail[2:6]), [0, 1, 2, 3])
        self.assertEqual(avail[1], 0)          # entries written, index not yet published
        self.assertTrue(self.vq.kick_prepare())   # used->flags clear: the device wants a kick
        self.assertEqual(avail[1], 4)
        self.assertFalse(self.vq.kick_prepare())  # nothing new since
        avail.release()
        del desc


class TestEventIdx(TestUsedRingChecks):
    """VIRTIO_RING_F_EVENT_IDX (spec 2.7.7, 2.7.10): the same used-ring checks, and
    kicks and interrupts asked for by index.  The test plays the device: it writes
    avail_event and reads used_event in memory."""

    EVENT_IDX = True

    def words(self):
        """(used_event view, avail_event view) of the current ring."""
        _, avail, used, _ = vp.vring_layout(self.num)
        tail = 4 + 2 * self.num
        views = (self.arena.view[avail + tail:avail + tail + 2].cast("H"),
                 self.arena.view[used + 4 + 8 * self.num:used + 6 + 8 * self.num].cast("H"))
        self.views = views
        return views

    def tearDown(self):
        for view in getattr(self, "views", ()):
            view.release()
        super().tearDown()

    def test_kick_only_when_avail_idx_passes_avail_event(self):
        _, avail_event = self.words()
        self.assertTrue(self.vq.kick_prepare())     # 0 -> 4 passes avail_event 0
        avail_event[0] = 6                          # the device: kick me once idx passes 6
        self.vq.add_bufs([4, 5])
        self.assertFalse(self.vq.kick_prepare())    # 4 -> 6: not past 6
        self.vq.add_bufs([6])
        self.assertTrue(self.vq.kick_prepare())     # 6 -> 7: passes 6
        self.vq.add_bufs([7])
        self.assertFalse(self.vq.kick_prepare())    # 7 -> 8: passed already, the device is awake

    def test_kick_decision_across_the_index_wrap(self):
        _, avail_event = self.words()
        self.vq.kick_prepare()
        self.vq.avail_idx_shadow = 0xFFFE
        avail_event[0] = 0xFFFF
        self.vq.add_bufs([4, 5, 6])                 # 0xFFFE -> 1 passes 0xFFFF
        self.assertTrue(self.vq.kick_prepare())

    def test_enable_cb_asks_for_the_next_entry(self):
        used_event, _ = self.words()
        self.vq.last_used_idx = 2
        self.vq.avail_idx_shadow = 6
        self.publish((0, 10), (1, 10), start=0)     # idx 2: nothing pending
        self.assertTrue(self.vq.enable_cb())
        self.assertEqual(used_event[0], 2)
        self.publish((0, 10), (1, 10), (2, 10), start=0)
        self.assertFalse(self.vq.enable_cb())       # one came first: take it before sleeping

    def test_enable_cb_delayed_waits_for_three_quarters_in_flight(self):
        used_event, _ = self.words()
        self.assertEqual(self.vq.in_flight(), 4)
        self.publish((0, 10), (1, 10), (2, 10))
        self.assertTrue(self.vq.enable_cb_delayed())
        self.assertEqual(used_event[0], 3)          # interrupt once used->idx passes 3
        self.publish((0, 10), (1, 10), (2, 10), (3, 10))
        self.assertFalse(self.vq.enable_cb_delayed())

    def test_disable_cb_puts_used_event_behind(self):
        used_event, _ = self.words()
        self.publish((0, 10))
        self.vq.get_run()
        self.vq.disable_cb()
        self.assertEqual(used_event[0], 0)          # last_used_idx 1, minus one


def _interfaces():
    return set(os.listdir("/sys/class/net"))


class TestTap(unittest.TestCase):
    def test_kernel_names_taps_from_template(self):
        before = _interfaces()
        with vp.Tap("tap%d") as a, vp.Tap("tap%d") as b:
            self.assertRegex(a.name, r"^tap\d+$")
            self.assertNotIn(a.name, before)
            self.assertEqual(int(b.name[3:]), int(a.name[3:]) + 1)
            with open(f"/sys/class/net/{a.name}/tun_flags") as f:
                flags = int(f.read(), 16)
            self.assertEqual(flags & 0xFFFF, vp.IFF_TAP | vp.IFF_NO_PI | vp.IFF_VNET_HDR)
            self.assertEqual(a.flags() & 0x7FFF, vp.IFF_TAP | vp.IFF_NO_PI | vp.IFF_VNET_HDR)
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

    def test_bad_names_rejected(self):
        for bad in ("", "x" * 16, "a/b", "a b"):
            with self.subTest(name=bad), self.assertRaises(vp.VhostPathError):
                vp.Tap(bad)


class TestInsertVlanTag(unittest.TestCase):
    """insert_vlan_tag on a buffer, and on one scattered over views as received: the tag
    after the MACs, the header's offsets moved."""

    def test_tag_goes_after_the_macs_and_offsets_grow(self):
        hdr = vp.virtio_net_hdr(flags=vp.VIRTIO_NET_HDR_F_NEEDS_CSUM,
                                gso_type=vp.VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54,
                                gso_size=1448, csum_start=34, csum_offset=16)
        eth = bytes(range(1, 13)) + b"\x08\x00"
        buf = bytearray(b"\xee" * 4 + bytes(hdr) + eth + b"payload")
        front = vp.insert_vlan_tag(memoryview(buf), 4, 10, 0x88A8, 0x2064)
        self.assertEqual(front, 0)
        out = vp.virtio_net_hdr.from_buffer_copy(buf)
        self.assertEqual((out.flags, out.gso_type, out.hdr_len, out.gso_size, out.csum_start,
                          out.csum_offset), (1, vp.VIRTIO_NET_HDR_GSO_TCPV4, 58, 1448, 38, 16))
        self.assertEqual(bytes(buf[10:]), eth[:12] + b"\x88\xa8\x20\x64" + eth[12:] + b"payload")

    def test_plain_frame_keeps_a_zero_header(self):
        buf = bytearray(4 + 10 + 14)
        buf[14:28] = bytes(range(14))
        vp.insert_vlan_tag(memoryview(buf), 4, 10, vp.ETH_P_8021Q, 7)
        self.assertEqual(bytes(buf[:10]), bytes(10))
        self.assertEqual(bytes(buf[10:]), bytes(range(12)) + b"\x81\x00\x00\x07" + bytes([12, 13]))

    def test_scattered_frame_is_tagged_across_its_views(self):
        hdr = vp.virtio_net_hdr(flags=vp.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34,
                                csum_offset=6)
        frame = bytes(range(12)) + b"\x08\x00" + bytes(range(100, 140))
        raw = bytes(hdr) + frame
        store = bytearray(len(raw) + 8)
        store[:len(raw)] = raw                  # as recvmmsg scattered it over three views
        views = [memoryview(store)[:10], memoryview(store)[10:18], memoryview(store)[18:]]
        n = vp._insert_vlan_tag_scattered(views, len(raw), vp.ETH_P_8021Q, 5)
        self.assertEqual(n, len(raw) + 4)
        self.assertEqual(vp.virtio_net_hdr.from_buffer_copy(store).csum_start, 38)
        self.assertEqual(bytes(store[10:n]), frame[:12] + b"\x81\x00\x00\x05" + frame[12:])
        small = [memoryview(bytearray(10)), memoryview(bytearray(len(frame) + 3))]
        self.assertIsNone(vp._insert_vlan_tag_scattered(small, len(raw), vp.ETH_P_8021Q, 5))


class TestPacketRxRing(unittest.TestCase):
    """The NIC's receive ring on a veth (MTU 4000, so that frames over a 2 KB slot
    come too): frames in ring order behind their virtio_net_hdr, big ones queued
    whole on the socket, drops while the ring is full, the socket as before once
    the ring is closed, and a VLAN tag reported beside its frame (in the slot, and
    in PACKET_AUXDATA of recvmmsg)."""

    def setUp(self):
        topo.make_outside(offloads=False)
        self.addCleanup(topo.remove_outside)
        for ns in (None, topo.NS):
            topo.sh("ip", "link", "set", "veth1" if ns else "veth0", "mtu", "4000", ns=ns)
        topo.configure_tap("veth0")             # the kernel answers the outside's pings
        self.nic = vp.PacketSocket("veth0")
        self.addCleanup(self.nic.close)

    def ping_in(self, count, size):
        topo.sh("ping", "-c", str(count), "-i", "0.2", "-s", str(size), topo.KERNEL_IP,
                ns=topo.NS, check=False)

    def test_frames_in_order_and_big_ones_whole(self):
        ring = vp.PacketRxRing(self.nic, 64, 1518)
        self.addCleanup(ring.close)
        self.assertEqual((ring.frame_size, ring.MAC_OFFSET), (2048, 76))
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

    def send_tagged(self, count=1):
        """Send ``count`` frames tagged 0x2064 raw from the outside; return one as sent.
        veth0's receive path takes the tag off (skb_vlan_untag) before packet sockets
        see it."""
        def mac(dev, ns=None):
            return bytes.fromhex(topo.sh("cat", f"/sys/class/net/{dev}/address",
                                         ns=ns).strip().replace(":", ""))
        sent = (mac("veth0") + mac("veth1", topo.NS) + b"\x81\x00\x20\x64\x88\xb5"
                + bytes(range(46)))
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


def _run_tool(*args, **kw):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          timeout=60, **kw)


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
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        self.assertFails(r, "Linux only", "darwin")

    def test_not_root(self):
        exe = topo.unprivileged_python()
        r = subprocess.run([exe, TOOL, "--iface", "lo"], user=65534, group=65534,
                           extra_groups=[], capture_output=True, text=True, timeout=60)
        self.assertFails(r, "permission denied", "root", "CAP_NET_ADMIN")

    def test_vhost_net_missing(self):
        r = _run_tool("--iface", "lo", "--backend", "vhost-net", "--path",
                      "/nonexistent/vhost-net")
        self.assertFails(r, "/nonexistent/vhost-net does not exist", "modprobe vhost_net")

    def test_nic_backend_vhost_net_needs_vhost_net(self):
        self.assertFails(_run_tool("--iface", "lo", "--backend", "tap", "--nic-backend",
                                   "vhost-net"), "--nic-backend vhost-net needs the vhost-net "
                                                 "backend")
        self.assertFails(_run_tool("--iface", "lo", "--nic-backend", "vhost-net", "--path",
                                   "/nonexistent"), "--nic-backend vhost-net",
                         "/nonexistent does not exist")

    def test_nic_missing(self):
        r = _run_tool("--iface", "nosuchnic0", "--path", "/dev/null")
        self.assertFails(r, "nosuchnic0", "no such network interface")

    def test_bad_queue_size(self):
        for bad in ("100", "0", "65536"):
            with self.subTest(size=bad):
                self.assertFails(_run_tool("--iface", "lo", "--queue-size", bad),
                                 "--queue-size", "power of two")
        self.assertFails(_run_tool("--iface", "lo", "--queue-size", "32"),
                         "--queue-size", "at least 64")

    def test_lro_without_rx_checksum(self):
        self.assertFails(_run_tool("--iface", "lo", "--lro", "--no-rx-cksum"),
                         "--lro needs rx checksum")
        # --no-rx-cksum alone turns the default LRO off instead of failing.
        self.assertFails(_run_tool("--iface", "lo", "--no-rx-cksum", "--backend", "vhost-net",
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

    def test_tap_same_as_nic(self):
        self.assertFails(_run_tool("--iface", "lo", "--path", "/dev/null", "--tap", "lo"),
                         "NIC itself")

    def test_help_touches_nothing(self):
        r = _run_tool("--help")
        self.assertEqual(r.returncode, 0)
        self.assertIn("--queue-size", r.stdout)


class TestTapBackendBridge(BridgeCase, unittest.TestCase):
    """The tap backend end to end on this host: defaults (LRO), veth's offloads on."""
    BACKEND = "tap"
    LRO = True


class TestTapBackendBridgeNoOffload(BridgeCase, unittest.TestCase):
    """The tap backend without offloads anywhere."""
    BACKEND = "tap"
    ARGS = ("--no-lro", "--no-rx-cksum")
    OFFLOADS = False


class TestTapBackendShutdown(ShutdownCase, unittest.TestCase):
    BACKEND = "tap"


class TestTapBackendDemo(DemoCase, unittest.TestCase):
    BACKEND_LINE = "through the tap backend (read/write), bridging vpdemo0 <-> tap0"

    @classmethod
    def setUpClass(cls):
        if os.path.exists("/dev/vhost-net"):
            raise unittest.SkipTest("this host has vhost-net: auto would not fall back")


class TestTapBackendQueues(QueuesCase, unittest.TestCase):
    BACKEND = "tap"
    QUEUES = 2


class TestTapBackendQueuesShutdown(QueuesShutdownCase, unittest.TestCase):
    BACKEND = "tap"


class TestQueuesErrors(unittest.TestCase):
    def test_queue_count_out_of_range(self):
        for bad in ("0", "257"):
            with self.subTest(queues=bad):
                r = _run_tool("--iface", "lo", "--queues", bad)
                self.assertEqual(r.returncode, 1)
                self.assertIn("--queues must be from 1 to 256", r.stderr)

    def test_existing_single_queue_tap(self):
        topo.make_outside()
        topo.sh("ip", "tuntap", "add", "vpsq0", "mode", "tap", "vnet_hdr")
        try:
            r = _run_tool("--iface", "veth0", "--backend", "tap", "--tap", "vpsq0",
                          "--queues", "2")
        finally:
            topo.sh("ip", "tuntap", "del", "vpsq0", "mode", "tap")
            topo.remove_outside()
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stderr.strip().splitlines(), [
            "vhostpath: vpsq0 is a single-queue tap: --queues 2 needs a multi-queue one "
            "('ip tuntap add vpsq0 mode tap multi_queue vnet_hdr') or a new tap"])


class TestAutoBackendFallback(unittest.TestCase):
    def setUp(self):
        topo.make_outside()

    def tearDown(self):
        topo.remove_outside()

    def test_missing_vhost_net_falls_back_to_tap_with_a_warning(self):
        tool = topo.Tool("--iface", "veth0", "--path", "/nonexistent/vhost-net")
        rc, _, err = tool.stop()
        self.assertEqual(rc, 0, err)
        self.assertIn("through the tap backend (read/write)", tool.first_line)
        self.assertIn("warning: /nonexistent/vhost-net does not exist: load the vhost-net "
                      "driver with 'modprobe vhost_net'. Falling back to the tap backend", err)


if __name__ == "__main__":
    unittest.main()
