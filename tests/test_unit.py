"""Unit tier: pure functions and in-memory rings; no root, no network, no kernel device.

Ring arithmetic and the driver's checks of what a device publishes (a test
plays the device by writing the used ring in memory), EVENT_IDX, runs, VLAN
tag insertion, header and feature helpers, and option validation.  tests/run.py
runs it first.
"""

import array
import ctypes
import time
import types
import unittest

import vhostpath as vp


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
                         "CSUM GUEST_CSUM GUEST_TSO4 GUEST_TSO6 HOST_TSO4 HOST_TSO6 "
                         "GUEST_USO4 GUEST_USO6")
        with self.assertRaisesRegex(vp.VhostPathError, "LRO needs rx checksum"):
            vp.offload_features(False, True)

    def test_tap_offloads(self):
        self.assertEqual(vp.tap_offloads(vp.offload_features(False, False)), 0)
        self.assertEqual(vp.tap_offloads(vp.offload_features(True, False)), vp.TUN_F_CSUM)
        self.assertEqual(vp.tap_offloads(vp.offload_features(True, True)),
                         vp.TUN_F_CSUM | vp.TUN_F_TSO4 | vp.TUN_F_TSO6 | vp.TUN_F_USO4
                         | vp.TUN_F_USO6)
        # Newer than the build host's headers (6.1): pinned from linux/if_tun.h and
        # linux/virtio_net.h of 6.2.
        self.assertEqual((vp.TUN_F_USO4, vp.TUN_F_USO6), (0x20, 0x40))
        self.assertEqual((vp.VIRTIO_NET_F_GUEST_USO4, vp.VIRTIO_NET_F_GUEST_USO6), (54, 55))
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
        self.views = []                     # into the arenas: released first
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
        for view in self.views:
            view.release()
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
        for run in iter(lambda: vq.get_run(**kw), None):
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
        is descriptor f % 8) in ring order, with the spill area a big one held;
        a tap TX ring that used them out of order is broken.  The bridge's other
        parts are plain stand-ins."""
        for used, released in (([6, 7, 0, 1], [(14, 4)]), ([6, 7, 1, 0], None)):
            vq = self.make(device_writes=False)
            vq.last_used_idx = vq.avail_idx_shadow = 6
            vq.add_bufs([6, 7, 0, 1])
            self.publish(*[(desc_id, 0) for desc_id in used], start=6)
            given = []
            ring = types.SimpleNamespace(frame_nr=16, release=lambda f, n: given.append((f, n)))
            bridge = types.SimpleNamespace(tap_txq=vq, nic_ring=ring, _nic_tail=14,
                                           queue_size=self.num, _spill_of={7: 3}, _spills=[])
            with self.subTest(used=used):
                if released is None:
                    with self.assertRaisesRegex(vp.RingBrokenError, "out of order"):
                        vp.VhostBridge._release(bridge)
                    self.assertTrue(vq.broken)
                else:
                    vp.VhostBridge._release(bridge)
                    self.assertEqual((given, bridge._nic_tail), (released, 2))
                    self.assertEqual((bridge._spills, bridge._spill_of), ([3], {}))

    def merging_bridge(self):
        """Stand-ins for VhostBridge._forward with merged buffers: the tap RX ring
        (descriptors 0-7 offered, 256 bytes each, 12-byte headers), the NIC TX
        ring, and what it counts."""
        tx = self.make(device_writes=False)
        self.tx_arena = self.arena
        rx = self.make()
        for desc_id in range(4, 8):
            rx.add_buf(desc_id, 256)
        pool = self.arena.view[vp.vring_layout(self.num)[3]:][:self.num * 256]
        counted = []
        bridge = types.SimpleNamespace(
            tap_rxq=rx, nic_txq=tx, hdr_len=12, merged=True, _rx_min_len=1, _merging=None,
            _chains={},
            _num_buffers=pool.cast("H")[5::128], _ones=memoryview(array.array("H", [1] * 8)),
            tap_stats=None, nic_stats=None,
            _count=lambda rx_stats, tx_stats, lengths: counted.extend(lengths))
        bridge._forward_run = lambda *run: vp.VhostBridge._forward_run(bridge, *run)
        bridge._forward_merged = lambda *run: vp.VhostBridge._forward_merged(bridge, *run)
        self.views += [bridge._num_buffers, pool]
        return bridge, counted

    def test_merged_buffers_go_out_chained(self):
        """A packet the device spread over k buffers (num_buffers k, all but the last
        full) goes on the NIC TX ring as a chain of those k descriptors, also when
        its buffers come in two runs; single ones stay single; a recycled chain is
        unchained."""
        bridge, counted = self.merging_bridge()
        tx, nb = bridge.nic_txq, bridge._num_buffers
        nb[0], nb[1], nb[5] = 1, 3, 2                 # packets at 0, 1-3, 5-6 (wrapping)
        self.publish((0, 100), (1, 256), (2, 256), (3, 50), (5, 256))
        kicks = []
        self.assertEqual(vp.VhostBridge._forward(bridge, kicks), 2)
        self.assertIsNotNone(bridge._merging)         # packet 5-6 half here
        self.publish((6, 20), start=5)
        self.assertEqual(vp.VhostBridge._forward(bridge, kicks), 1)
        self.assertEqual(counted, [100, 562, 276])
        self.assertEqual(bridge._chains, {1: [1, 2, 3], 5: [5, 6]})
        desc = (vp.vring_desc * self.num).from_buffer(self.tx_arena.mm)
        self.assertEqual([(desc[i].flags, desc[i].next, desc[i].len) for i in (1, 2, 3, 5, 6)],
                         [(1, 2, 256), (1, 3, 256), (0, 0, 50), (1, 6, 256), (0, 0, 20)])
        tx.unchain(bridge._chains[1])
        self.assertEqual([desc[i].flags for i in (1, 2, 3)], [0, 0, 0])
        del desc

    def test_merged_buffers_checked(self):
        for num_buffers, used, message in ((0, ((0, 100),), "num_buffers 0 in a 8-entry ring"),
                                           (9, ((0, 100),), "num_buffers 9"),
                                           (2, ((0, 100), (1, 10)), "holds 100 of 256 bytes"),
                                           (1, ((0, 11),), "shorter than the 12-byte header")):
            with self.subTest(message=message):
                bridge, _ = self.merging_bridge()
                bridge._num_buffers[0] = num_buffers
                self.publish(*used)
                with self.assertRaisesRegex(vp.RingBrokenError, message):
                    vp.VhostBridge._forward(bridge, [])

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
        ids = vq.take_free(3)
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
        n = vp.insert_vlan_tag_scattered(views, len(raw), vp.ETH_P_8021Q, 5)
        self.assertEqual(n, len(raw) + 4)
        self.assertEqual(vp.virtio_net_hdr.from_buffer_copy(store).csum_start, 38)
        self.assertEqual(bytes(store[10:n]), frame[:12] + b"\x81\x00\x00\x05" + frame[12:])
        small = [memoryview(bytearray(10)), memoryview(bytearray(len(frame) + 3))]
        self.assertIsNone(vp.insert_vlan_tag_scattered(small, len(raw), vp.ETH_P_8021Q, 5))


class TestDemoEchoRequest(unittest.TestCase):
    """The demo's own pings: a checksum the receiver verifies, also where the ones'
    complement sum carries twice (the outside host's pid 572 in a CI guest: its
    second and third pings were dropped by the kernel as InCsumErrors)."""

    def test_checksum_verifies_for_every_ident(self):
        for ident in range(0x10000):
            for seq in (1, 2, 3):
                message = vp._echo_request(ident, seq)
                words = sum(int.from_bytes(message[i:i + 2], "big")
                            for i in range(0, len(message), 2))
                words = (words & 0xFFFF) + (words >> 16)
                words = (words & 0xFFFF) + (words >> 16)
                self.assertEqual(words, 0xFFFF, (ident, seq))
                self.assertEqual(message[:2], b"\x08\x00")
                self.assertEqual(message[4:8], ident.to_bytes(2, "big") + seq.to_bytes(2, "big"))


class TestPortStatsShared(unittest.TestCase):
    """PortStats in shared memory (QueuePairs): counters and the name written through
    one view are what another view of the same bytes reads, as a worker's reach the
    parent; a name must be an interface name."""

    def test_name_and_counters_cross_views(self):
        shared = bytearray(ctypes.sizeof(vp.PortStats))
        worker, parent = (vp.PortStats.from_buffer(shared) for _ in range(2))
        parent.name, parent.mtu = "tap0", None        # as QueuePairs sets them
        worker.name, worker.rx_packets = "vpnew0", 7
        self.assertEqual((parent.name, parent.rx_packets), ("vpnew0", 7))
        self.assertIn("Forward statistics for port 1 (vpnew0)", parent.report(1))
        self.assertEqual(vp.PortStats("x" * 15).name, "x" * 15)
        with self.assertRaises(ValueError):
            vp.PortStats("x" * 17)


class TestTrafficRate(unittest.TestCase):
    """The rate that gates busy-polling: sparse until a whole period has carried
    either limit's rate, then judged anew at the end of each period (from the
    first look after it), so a burst within a period does not end it early."""

    def test_sparse_then_bulk_then_sparse(self):
        t = time.monotonic()
        rate = vp._TrafficRate(1000, 100000, 0.01)    # per 10 ms: 10 frames, 1000 bytes
        self.assertTrue(rate.sparse(50, 500, t + 0.001))        # the period under way
        self.assertFalse(rate.sparse(51, 510, t + 0.011))       # 51 frames in 11 ms: bulk
        self.assertFalse(rate.sparse(52, 520, t + 0.015))       # judged at period ends
        self.assertFalse(rate.sparse(72, 720, t + 0.022))       # 21 frames in 11 ms
        self.assertTrue(rate.sparse(73, 730, t + 0.042))        # 1 in 20 ms: sparse again
        self.assertTrue(rate.sparse(82, 820, t + 0.053))        # 9 in 11 ms: under
        self.assertFalse(rate.sparse(83, 2820, t + 0.064))      # 2000 bytes in 11 ms: bulk
        self.assertTrue(rate.sparse(84, 2830, t + 0.075))


class TestConfig(unittest.TestCase):
    """One validated configuration: library keywords and the command line alike."""

    def test_defaults_resolve_the_nic_io(self):
        self.assertEqual(vp.Config().nic_io, "vhost-net")
        self.assertEqual(vp.Config(tap_io="read-write").nic_io, "socket")
        config = vp.Config(mac="02:00:00:00:00:09", rx_cksum=True, lro=True)
        self.assertEqual(config.mac, bytes.fromhex("020000000009"))
        self.assertEqual(config.offloads, vp.offload_features(True, True))

    def test_each_refusal_names_its_keyword(self):
        for options, keyword, why in (
                (dict(tap_io="tap"), "tap_io", "not one of vhost-net, read-write"),
                (dict(nic_io="ring"), "nic_io", "not one of"),
                (dict(tap_io="read-write", nic_io="vhost-net"), "nic_io", "needs tap I/O"),
                (dict(queue_size=100), "queue_size", "power of two"),
                (dict(queue_size=65536), "queue_size", "power of two"),
                (dict(queue_size=32), "queue_size", "from 64 to 32768"),
                (dict(queue_size=256.0), "queue_size", "not 256.0"),
                (dict(queue_size="256"), "queue_size", "not '256'"),
                (dict(queues="2"), "queues", "not '2'"),
                (dict(queues=True), "queues", "not True"),
                (dict(busy_poll=1.5), "busy_poll", "not 1.5"),
                (dict(path=None), "path", "a device node's path"),
                (dict(tap=""), "tap", "neither an interface name nor a template"),
                (dict(tap="%d%d"), "tap", "neither"),
                (dict(tap="tap%s"), "tap", "neither"),
                (dict(tap="a b"), "tap", "neither"),
                (dict(tap="x" * 16), "tap", "neither"),
                (dict(tap=5), "tap", "neither"),
                (dict(up="yes"), "up", "must be True or False"),
                (dict(rx_cksum=1), "rx_cksum", "must be True or False"),
                (dict(mac=5), "mac", "not a MAC address"),
                (dict(mac=b"\x02\x00"), "mac", "not a MAC address"),
                (dict(mac=b"\x01" * 6), "mac", "not a unicast"),
                (dict(address=[5]), "address", "5 is not an address"),
                (dict(netns=5), "netns", "not a network namespace name"),
                (dict(lro=True), "lro", "needs rx checksum offload"),
                (dict(mac="zz:00"), "mac", "invalid MAC"),
                (dict(mac="01:00:5e:00:00:01"), "mac", "not a unicast"),
                (dict(queues=0), "queues", "from 1 to 256"),
                (dict(queues=257), "queues", "from 1 to 256"),
                (dict(address=["192.0.2.1"]), "address", "has no prefix length"),
                (dict(address=["192.0.2.1/33"]), "address", "not an IPv4 or IPv6 address"),
                (dict(address=["2001:db8::1/64", "tap0/24"]), "address", "'tap0/24' is not"),
                (dict(netns="../x"), "netns", "not a network namespace name"),
                (dict(netns=""), "netns", "not a network namespace name"),
                (dict(busy_poll=-1), "busy_poll", "from 0 (off) to 1000000 microseconds"),
                (dict(busy_poll=2000000), "busy_poll", "not 2000000"),
                (dict(vhost_busy_poll=-5), "vhost_busy_poll", "from 0 (off) to 1000000"),
                (dict(vhost_busy_poll="50"), "vhost_busy_poll", "not '50'"),
                (dict(tap_io="read-write", vhost_busy_poll=50), "vhost_busy_poll",
                 "needs tap I/O vhost-net, not read-write")):
            with self.subTest(**options):
                with self.assertRaises(vp.ConfigError) as cm:
                    vp.Config(**options)
                self.assertEqual(cm.exception.option, keyword)
                self.assertIn(why, str(cm.exception))
                self.assertTrue(str(cm.exception).startswith(keyword + ": "))

    def test_tap_placement_and_the_nic_mac(self):
        import ipaddress
        config = vp.Config(address=["192.0.2.1/24", "2001:db8::1/64"], netns="ctr", mac="nic")
        self.assertEqual(config.address, (ipaddress.ip_interface("192.0.2.1/24"),
                                          ipaddress.ip_interface("2001:db8::1/64")))
        self.assertEqual(config.netns, "ctr")
        self.assertEqual(vp.Config(**config.options()).options(), config.options())
        # One address alone, and a MAC as bytes, are taken as they are meant.
        self.assertEqual(vp.Config(address="192.0.2.1/24").address,
                         (ipaddress.ip_interface("192.0.2.1/24"),))
        self.assertEqual(vp.Config(mac=bytes.fromhex("020000000009")).mac,
                         bytes.fromhex("020000000009"))
        # "nic" takes a NIC's address; a port alone has none to take.
        with self.assertRaisesRegex(vp.ConfigError, "^mac: 'nic' takes the NIC's address"):
            config.tap_mac()
        self.assertIsNone(vp.Config().tap_mac())

    def test_unknown_keyword_and_mixed_forms_are_refused(self):
        with self.assertRaises(TypeError):
            vp.Config(queue_sise=64)
        with self.assertRaisesRegex(TypeError, "besides a Config: queue_size"):
            vp.VirtioUserPort(vp.Config(), queue_size=64)

    def test_command_line_names_the_option(self):
        parser = vp._build_parser()
        for argv, message in ((["--queue-size", "100"], "--queue-size: must be a power of two"),
                              (["--lro", "--no-rx-cksum"], "--lro: needs rx checksum"),
                              (["--queues", "0"], "--queues: must be from 1 to 256"),
                              (["--address", "10.0.0.1"], "--address: '10.0.0.1' has no "
                                                          "prefix length")):
            args = parser.parse_args(["--iface", "eth9", "--tap-io", "vhost-net", *argv])
            with self.subTest(argv=argv), self.assertRaises(vp.VhostPathError) as cm:
                vp._config_from_args(args)
            self.assertTrue(str(cm.exception).startswith(message), str(cm.exception))

    def test_command_line_offload_defaults(self):
        parser = vp._build_parser()
        for argv, expected in (([], (True, True)), (["--no-rx-cksum"], (False, False)),
                               (["--no-lro"], (True, False))):
            args = parser.parse_args(["--iface", "eth9", "--tap-io", "vhost-net", *argv])
            config = vp._config_from_args(args)
            self.assertEqual((config.rx_cksum, config.lro), expected, argv)

    def test_every_config_keyword_is_a_command_line_option(self):
        args = vp._build_parser().parse_args(["--iface", "eth9"])
        self.assertEqual([k for k in vp.Config.OPTIONS if not hasattr(args, k)], [])


if __name__ == "__main__":
    unittest.main()
