#!/usr/bin/env python3
"""vhostpath: the virtio-user "exceptional path" in one standard-library Python file.

A user-space virtio-net *driver* opens ``/dev/vhost-net``; the kernel's vhost
worker thread moves packets between the driver's virtqueues and a tap device
(``tap0``), i.e. into the Linux network stack.  vhostpath bridges a NIC (an
``AF_PACKET`` raw socket) to those virtqueues, so that what arrives on the NIC
reaches the kernel through ``tap0`` and what the kernel sends on ``tap0`` leaves
through the NIC.  By default (``VhostBridge``) the kernel moves every frame and
Python only hands descriptors on: frames from the NIC land in the packet
socket's mmap'd receive ring, whose slots are the tap TX ring's buffers, and a
second vhost-net device sends the tap's frames out on the packet socket::

    NIC eth1 --AF_PACKET RX ring (softirq)=[ring slot = TX desc]--vhost-net--> tap0 --> stack
    NIC eth1 <-AF_PACKET--vhost-net--- [TX ring <- RX ring] <-vhost-net--------- tap0 <-- stack

With ``--nic-io socket`` this process reads and writes the NIC socket itself
(recvmmsg/sendmmsg, ``Bridge``), as DPDK's af_packet port does, and sees every
frame; with ``--tap-io read-write`` (where /dev/vhost-net is missing) it also
reads and writes the tap.  Either way a frame's VLAN tag, which the kernel
takes off before a packet socket sees the frame, is put back on the way to
the tap.

Requirements: Linux 4.18 or later, CPython 3.6 or later, root (CAP_NET_ADMIN
and CAP_NET_RAW), and the ``vhost_net`` module (``modprobe vhost_net``).
Nothing outside the standard library.

Command line::

    sudo python3 vhostpath.py demo            # the whole path on this host, then removed
    sudo python3 vhostpath.py --iface eth1 --address 192.0.2.1/24   # eth1 <-> tap0, up
    sudo python3 vhostpath.py cleanup --iface eth1   # after a SIGKILL: eth1 put back

Library::

    import vhostpath
    with vhostpath.VirtioUserPort(queue_size=256) as port:   # creates tap0
        port.tx_burst([frame])                               # frames into the kernel
        frames = port.rx_burst()                             # frames from the kernel

    # A NIC bridged to the kernel, as the command line does it:
    config = vhostpath.Config(queue_size=1024, rx_cksum=True, lro=True)
    with contextlib.ExitStack() as stack:
        nic = vhostpath.PacketSocket("eth1")
        stack.callback(nic.close)
        vhostpath.open_bridge(config, nic, stack).run()      # until stop()

The module reads top to bottom in layers, each using only those above it:
kernel ABI, errors and syscall helpers, virtio-net features, the arena, the
split virtqueue, rtnetlink, VLAN frames and Frame, devices, the vhost-net
bring-up, configuration, ports, forwarders, queue pairs, command line, demo.

Licence: BSD-3-Clause.
"""

__version__ = "0.1.0"
__all__ = [
    "VhostPathError", "RingBrokenError", "ConfigError",
    "vnet_hdr_len", "offload_features", "tap_offloads", "feature_names",
    "Arena", "SplitVirtqueue", "vring_layout",
    "socket_in_netns", "Link", "Rtnl", "restore_nic", "Tap", "restore_tap", "VhostNet",
    "attach_filter", "PacketSocket", "PacketRxRing", "QuietNic", "VhostDevices",
    "insert_vlan_tag", "insert_vlan_tag_scattered", "Frame",
    "Config", "check_filter", "load_filter", "PortStats", "Port", "VirtioUserPort", "TapPort",
    "PASS", "BOUNCE", "DROP", "KEEP", "INWARD", "OUTWARD",
    "Bridge", "VhostBridge", "open_bridge", "QueuePairs",
    "main",
]

import argparse
import array
import contextlib
import ctypes
import errno
import fcntl
import math
import mmap
import os
import platform
import select
import signal
import socket
import struct
import sys
import time

########################################################################################
# Kernel ABI: constants
########################################################################################

# asm-generic/ioctl.h (x86, arm, riscv): dir:2 | size:14 | type:8 | nr:8
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction, kind, nr, size):
    return (direction << 30) | (size << 16) | (kind << 8) | nr


def _IO(kind, nr):
    return _IOC(_IOC_NONE, kind, nr, 0)


def _IOR(kind, nr, ctype):
    return _IOC(_IOC_READ, kind, nr, ctypes.sizeof(ctype))


def _IOW(kind, nr, ctype):
    return _IOC(_IOC_WRITE, kind, nr, ctypes.sizeof(ctype))


def _IOWR(kind, nr, ctype):
    return _IOC(_IOC_READ | _IOC_WRITE, kind, nr, ctypes.sizeof(ctype))


# linux/virtio_config.h, virtio_ring.h, virtio_net.h: feature bits
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_GUEST_USO4 = 54           # virtio 1.3, Linux 6.2 (newer than these headers)
VIRTIO_NET_F_GUEST_USO6 = 55
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33

# linux/virtio_ring.h
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
VRING_ALIGN = 4096                      # the legacy "standard layout" alignment of the used ring
VIRTQUEUE_MAX_SIZE = 32768              # virtio 1.2 2.7: a split queue's largest size

# linux/virtio_net.h: struct virtio_net_hdr flags and gso_type
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4

# linux/vhost.h
VHOST_VIRTIO = 0xAF
VHOST_NET_VQ_RX = 0                     # vring index 0: device -> driver (kernel -> us)
VHOST_NET_VQ_TX = 1                     # vring index 1: driver -> device (us -> kernel)
VHOST_FILE_UNBIND = -1

# linux/if_tun.h
TUN_TYPE = ord("T")
IFF_TAP = 0x0002
IFF_NAPI = 0x0010                       # Linux 4.15
IFF_MULTI_QUEUE = 0x0100
IFF_PERSIST = 0x0800                    # TUNGETIFF: made to outlive its fds (ip tuntap add)
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20                       # Linux 6.2
TUN_F_USO6 = 0x40
MAX_TAP_QUEUES = 256                    # drivers/net/tun.c

# linux/sockios.h, linux/if_arp.h, linux/if.h
SIOCGIFADDR = 0x8915
SIOCSIFHWADDR = 0x8924
ARPHRD_ETHER = 1
IFNAMSIZ = 16

# linux/socket.h, linux/if_ether.h, linux/if_packet.h
AF_PACKET = 17
SOL_PACKET = 263
ETH_P_ALL = 0x0003
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_HLEN = 14
ETH_ALEN = 6
VLAN_HLEN = 4                           # linux/if_vlan.h (not uapi): TPID + TCI
TAP_MAX_MTU = 0xFFFF - ETH_HLEN         # tun.c: max_mtu = MAX_MTU - hard_header_len
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_COPY_THRESH = 7
PACKET_AUXDATA = 8
PACKET_VERSION = 10
TPACKET_V1 = 0
TPACKET_V2 = 1
TPACKET_ALIGNMENT = 16
TPACKET2_HDRLEN = 52                    # TPACKET_ALIGN(sizeof(tpacket2_hdr)) + sizeof(sockaddr_ll)
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1 << 0
TP_STATUS_COPY = 1 << 1
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
PACKET_VNET_HDR = 15
PACKET_VNET_HDR_SZ = 24                 # Linux 6.4
PACKET_IGNORE_OUTGOING = 23
PACKET_FANOUT = 18
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_IGNORE_OUTGOING = 0x4000
MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20

# asm-generic/socket.h, linux/filter.h, linux/bpf_common.h: classic BPF socket filters
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
BPF_LD, BPF_JMP, BPF_RET = 0x00, 0x05, 0x06
BPF_W, BPF_ABS, BPF_JEQ, BPF_K = 0x00, 0x20, 0x10, 0x00
SKF_AD_OFF = -0x1000
SKF_AD_PKTTYPE = 4
PACKET_OUTGOING = 4                     # linux/if_packet.h: sll_pkttype, skb->pkt_type
BPF_MAXINSNS = 4096

# linux/eventfd.h: O_CLOEXEC and O_NONBLOCK of asm-generic/fcntl.h (x86, arm64)
EFD_CLOEXEC = 0o2000000
EFD_NONBLOCK = 0o4000

# linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/if_addr.h, linux/if.h
NETLINK_ROUTE = 0
RTMGRP_LINK = 1
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x300, 0x200, 0x400
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_OPERSTATE, IFLA_NET_NS_FD = 1, 3, 4, 16, 28
IFLA_NEW_NETNSID = 45                   # in RTM_DELLINK of a link moved to another namespace
IFA_ADDRESS, IFA_LOCAL = 1, 2
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 1 << 15, 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)
IF_OPER_UNKNOWN, IF_OPER_UP = 0, 6      # RFC 2863 operstate; UNKNOWN: a device without one
IFF_UP = 0x1

# linux/capability.h: bits of CapEff in /proc/self/status
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13

# linux/prctl.h, linux/sched.h
PR_SET_PDEATHSIG = 1
CLONE_NEWNET = 0x40000000

# asm-generic/mman-common.h
MADV_NOHUGEPAGE = 15

INT_MAX = 2**31 - 1

########################################################################################
# Kernel ABI: structures (field for field as in the uapi headers, x86_64 layout)
########################################################################################


class vhost_vring_state(ctypes.Structure):
    """linux/vhost_types.h: VHOST_SET_VRING_NUM / _BASE argument."""
    _fields_ = [("index", ctypes.c_uint), ("num", ctypes.c_uint)]


class vhost_vring_file(ctypes.Structure):
    """linux/vhost_types.h: VHOST_SET_VRING_KICK / _CALL, VHOST_NET_SET_BACKEND argument."""
    _fields_ = [("index", ctypes.c_uint), ("fd", ctypes.c_int)]


class vhost_vring_addr(ctypes.Structure):
    """linux/vhost_types.h: VHOST_SET_VRING_ADDR argument (note: used before avail)."""
    _fields_ = [
        ("index", ctypes.c_uint),
        ("flags", ctypes.c_uint),
        ("desc_user_addr", ctypes.c_uint64),
        ("used_user_addr", ctypes.c_uint64),
        ("avail_user_addr", ctypes.c_uint64),
        ("log_guest_addr", ctypes.c_uint64),
    ]


class vhost_memory_region(ctypes.Structure):
    """linux/vhost_types.h: one guest-physical -> user-virtual mapping."""
    _fields_ = [
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
        ("flags_padding", ctypes.c_uint64),
    ]


class vhost_memory(ctypes.Structure):
    """linux/vhost_types.h: header of VHOST_SET_MEM_TABLE; regions[] follow it."""
    _fields_ = [("nregions", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


class vring_desc(ctypes.Structure):
    """linux/virtio_ring.h: one descriptor of the split ring's descriptor table."""
    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("flags", ctypes.c_uint16),
        ("next", ctypes.c_uint16),
    ]


class vring_avail(ctypes.Structure):
    """linux/virtio_ring.h: header of the avail ring; ring[num] and used_event follow."""
    _fields_ = [("flags", ctypes.c_uint16), ("idx", ctypes.c_uint16)]


class vring_used_elem(ctypes.Structure):
    """linux/virtio_ring.h: one entry of the used ring."""
    _fields_ = [("id", ctypes.c_uint32), ("len", ctypes.c_uint32)]


class vring_used(ctypes.Structure):
    """linux/virtio_ring.h: header of the used ring; ring[num] and avail_event follow."""
    _fields_ = [("flags", ctypes.c_uint16), ("idx", ctypes.c_uint16)]


class virtio_net_hdr(ctypes.Structure):
    """linux/virtio_net.h: the header in front of every packet (10 bytes)."""
    _fields_ = [
        ("flags", ctypes.c_uint8),
        ("gso_type", ctypes.c_uint8),
        ("hdr_len", ctypes.c_uint16),
        ("gso_size", ctypes.c_uint16),
        ("csum_start", ctypes.c_uint16),
        ("csum_offset", ctypes.c_uint16),
    ]


class virtio_net_hdr_mrg_rxbuf(ctypes.Structure):
    """linux/virtio_net.h: the header with num_buffers, used with MRG_RXBUF (12 bytes)."""
    _fields_ = [("hdr", virtio_net_hdr), ("num_buffers", ctypes.c_uint16)]


# sizeof(struct virtio_net_hdr): the packet socket's header (PACKET_VNET_HDR), and
# the tap's without MRG_RXBUF; and sizeof(struct virtio_net_hdr_mrg_rxbuf).
VIRTIO_NET_HDR_LEN = ctypes.sizeof(virtio_net_hdr)
VIRTIO_NET_HDR_MRG_RXBUF_LEN = ctypes.sizeof(virtio_net_hdr_mrg_rxbuf)


class ifreq(ctypes.Structure):
    """linux/if.h: struct ifreq, reduced to the union members used here (40 bytes)."""

    class _ifru(ctypes.Union):
        class _hwaddr(ctypes.Structure):
            _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_ubyte * 14)]

        _fields_ = [("ifru_flags", ctypes.c_short), ("ifru_hwaddr", _hwaddr),
                    ("ifru_pad", ctypes.c_ubyte * 24)]

    _fields_ = [("ifr_name", ctypes.c_char * IFNAMSIZ), ("ifr_ifru", _ifru)]


class nlmsghdr(ctypes.Structure):
    """linux/netlink.h: the header of every netlink message."""
    _fields_ = [("nlmsg_len", ctypes.c_uint32), ("nlmsg_type", ctypes.c_uint16),
                ("nlmsg_flags", ctypes.c_uint16), ("nlmsg_seq", ctypes.c_uint32),
                ("nlmsg_pid", ctypes.c_uint32)]


class ifinfomsg(ctypes.Structure):
    """linux/rtnetlink.h: the body of RTM_NEWLINK / _DELLINK / _GETLINK."""
    _fields_ = [("ifi_family", ctypes.c_uint8), ("__ifi_pad", ctypes.c_uint8),
                ("ifi_type", ctypes.c_uint16), ("ifi_index", ctypes.c_int32),
                ("ifi_flags", ctypes.c_uint32), ("ifi_change", ctypes.c_uint32)]


class ifaddrmsg(ctypes.Structure):
    """linux/if_addr.h: the body of RTM_NEWADDR."""
    _fields_ = [("ifa_family", ctypes.c_uint8), ("ifa_prefixlen", ctypes.c_uint8),
                ("ifa_flags", ctypes.c_uint8), ("ifa_scope", ctypes.c_uint8),
                ("ifa_index", ctypes.c_uint32)]


class rtattr(ctypes.Structure):
    """linux/rtnetlink.h: an attribute's header; its data follows, padded to 4 bytes."""
    _fields_ = [("rta_len", ctypes.c_uint16), ("rta_type", ctypes.c_uint16)]


class packet_mreq(ctypes.Structure):
    """linux/if_packet.h: PACKET_ADD_MEMBERSHIP argument."""
    _fields_ = [
        ("mr_ifindex", ctypes.c_int),
        ("mr_type", ctypes.c_ushort),
        ("mr_alen", ctypes.c_ushort),
        ("mr_address", ctypes.c_ubyte * 8),
    ]


class iovec(ctypes.Structure):
    """linux/uio.h: one scatter/gather element."""
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class msghdr(ctypes.Structure):
    """linux/socket.h: struct user_msghdr."""
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_int),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_uint),
    ]


class cmsghdr(ctypes.Structure):
    """linux/socket.h: the header of one control message (CMSG_DATA follows)."""
    _fields_ = [("cmsg_len", ctypes.c_size_t), ("cmsg_level", ctypes.c_int),
                ("cmsg_type", ctypes.c_int)]


class mmsghdr(ctypes.Structure):
    """linux/socket.h: one message of sendmmsg(2) / recvmmsg(2)."""
    _fields_ = [("msg_hdr", msghdr), ("msg_len", ctypes.c_uint)]


class tpacket_stats(ctypes.Structure):
    """linux/if_packet.h: PACKET_STATISTICS result (clear on read)."""
    _fields_ = [("tp_packets", ctypes.c_uint), ("tp_drops", ctypes.c_uint)]


class tpacket_auxdata(ctypes.Structure):
    """linux/if_packet.h: the PACKET_AUXDATA control message of a received frame."""
    _fields_ = [("tp_status", ctypes.c_uint32), ("tp_len", ctypes.c_uint32),
                ("tp_snaplen", ctypes.c_uint32), ("tp_mac", ctypes.c_uint16),
                ("tp_net", ctypes.c_uint16), ("tp_vlan_tci", ctypes.c_uint16),
                ("tp_vlan_tpid", ctypes.c_uint16)]


class sock_filter(ctypes.Structure):
    """linux/filter.h: one classic BPF instruction."""
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class sock_fprog(ctypes.Structure):
    """linux/filter.h: SO_ATTACH_FILTER argument."""
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(sock_filter))]


class tpacket_req(ctypes.Structure):
    """linux/if_packet.h: PACKET_RX_RING geometry for TPACKET_V1/V2."""
    _fields_ = [("tp_block_size", ctypes.c_uint), ("tp_block_nr", ctypes.c_uint),
                ("tp_frame_size", ctypes.c_uint), ("tp_frame_nr", ctypes.c_uint)]


class tpacket2_hdr(ctypes.Structure):
    """linux/if_packet.h: the header at the start of every TPACKET_V2 ring frame."""
    _fields_ = [("tp_status", ctypes.c_uint32), ("tp_len", ctypes.c_uint32),
                ("tp_snaplen", ctypes.c_uint32), ("tp_mac", ctypes.c_uint16),
                ("tp_net", ctypes.c_uint16), ("tp_sec", ctypes.c_uint32),
                ("tp_nsec", ctypes.c_uint32), ("tp_vlan_tci", ctypes.c_uint16),
                ("tp_vlan_tpid", ctypes.c_uint16), ("tp_padding", ctypes.c_uint8 * 4)]


# linux/vhost.h
VHOST_GET_FEATURES = _IOR(VHOST_VIRTIO, 0x00, ctypes.c_uint64)
VHOST_SET_FEATURES = _IOW(VHOST_VIRTIO, 0x00, ctypes.c_uint64)
VHOST_SET_OWNER = _IO(VHOST_VIRTIO, 0x01)
VHOST_SET_MEM_TABLE = _IOW(VHOST_VIRTIO, 0x03, vhost_memory)
VHOST_SET_VRING_NUM = _IOW(VHOST_VIRTIO, 0x10, vhost_vring_state)
VHOST_SET_VRING_ADDR = _IOW(VHOST_VIRTIO, 0x11, vhost_vring_addr)
VHOST_SET_VRING_BASE = _IOW(VHOST_VIRTIO, 0x12, vhost_vring_state)
VHOST_GET_VRING_BASE = _IOWR(VHOST_VIRTIO, 0x12, vhost_vring_state)
VHOST_SET_VRING_KICK = _IOW(VHOST_VIRTIO, 0x20, vhost_vring_file)
VHOST_SET_VRING_CALL = _IOW(VHOST_VIRTIO, 0x21, vhost_vring_file)
VHOST_NET_SET_BACKEND = _IOW(VHOST_VIRTIO, 0x30, vhost_vring_file)
# Linux 4.6; the GET is _IOW in the header too, and vhost copies the answer back.
VHOST_SET_VRING_BUSYLOOP_TIMEOUT = _IOW(VHOST_VIRTIO, 0x23, vhost_vring_state)
VHOST_GET_VRING_BUSYLOOP_TIMEOUT = _IOW(VHOST_VIRTIO, 0x24, vhost_vring_state)

# linux/if_tun.h
TUNSETIFF = _IOW(TUN_TYPE, 202, ctypes.c_int)
TUNGETFEATURES = _IOR(TUN_TYPE, 207, ctypes.c_uint)
TUNSETOFFLOAD = _IOW(TUN_TYPE, 208, ctypes.c_uint)
TUNGETIFF = _IOR(TUN_TYPE, 210, ctypes.c_uint)
TUNSETSNDBUF = _IOW(TUN_TYPE, 212, ctypes.c_int)
TUNGETVNETHDRSZ = _IOR(TUN_TYPE, 215, ctypes.c_int)
TUNSETVNETHDRSZ = _IOW(TUN_TYPE, 216, ctypes.c_int)
TUNSETCARRIER = _IOW(TUN_TYPE, 226, ctypes.c_int)      # Linux 5.0

########################################################################################
# Errors and syscall helpers
########################################################################################


class VhostPathError(Exception):
    """A failure with a message fit for the user: bad input, missing device or privilege."""


class RingBrokenError(VhostPathError):
    """The device published something impossible on a used ring; the ring is unusable."""


class _Closing:
    """A context manager whose ``close()`` runs on leaving the ``with`` block."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _describe_oserror(e, tap):
    """A one-line message for an OSError from set-up (``tap``: the tap name asked for)."""
    if e.errno in (errno.EPERM, errno.EACCES):
        return f"permission denied: {e.strerror or e} (run as root)"
    if e.errno == errno.EBUSY and "TUNSETIFF" in str(e):
        return f"tap {tap} is already in use by another process"
    if e.errno == errno.EINVAL and "TUNSETIFF" in str(e):
        return f"cannot attach to tap {tap}: it is a tun device or its flags differ"
    return str(e)


def _ioctl(fd, name, request, arg=0, what=""):
    """The one ioctl choke point: errno kept, the request's name and device in the message."""
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as e:
        where = what or f"fd {fd}"
        raise OSError(e.errno, f"{name} on {where}: {os.strerror(e.errno)}") from None


def _page_round(size):
    """``size`` rounded up to whole pages."""
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


_libc_handle = None


def _libc():
    """The C library (errno kept for ctypes.get_errno), loaded on first use."""
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def _libc_error(call):
    """The OSError of the C library's ``call`` that just failed, from its errno."""
    e = ctypes.get_errno()
    return OSError(e, f"{call}: {os.strerror(e)}")


def _eventfd():
    """A non-blocking, close-on-exec eventfd(2): os.eventfd where Python has it (3.10+),
    else the C library's."""
    if hasattr(os, "eventfd"):
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fd = _libc().eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
    if fd < 0:
        raise _libc_error("eventfd")
    return fd


def _no_huge_pages(mm, addr, size):
    """madvise(MADV_NOHUGEPAGE) on the mapping ``mm`` (``size`` bytes at ``addr``):
    mmap.madvise where Python has it (3.8+), else the C library's.  A kernel
    without transparent huge pages refuses (EINVAL): nothing to undo then."""
    try:
        if hasattr(mm, "madvise"):
            mm.madvise(MADV_NOHUGEPAGE)
        elif _libc().madvise(ctypes.c_void_p(addr), ctypes.c_size_t(size), MADV_NOHUGEPAGE):
            raise _libc_error("madvise")
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise


class _Ticker:
    """A period kept by a poll loop: ``timeout()`` is poll()'s (ms; None without
    a period, or an ``until``), then ``due()`` is true once per period that has
    passed."""

    def __init__(self, interval):
        self.interval = interval
        self._next = time.monotonic() + interval if interval else None

    def timeout(self, until=None):
        """poll()'s timeout: until the next period, or ``until`` (a monotonic time)
        if sooner."""
        ends = [t for t in (self._next, until) if t is not None]
        if not ends:
            return None
        return max(0, math.ceil((min(ends) - time.monotonic()) * 1000))

    def due(self):
        if self._next is None or time.monotonic() < self._next:
            return False
        self._next += self.interval
        return True


class _TrafficRate:
    """Whether traffic is sparse: under ``max_frames`` frames and ``max_bytes``
    bytes a second, measured over periods of at least ``period`` seconds (the
    last one ended, or the one under way once it is that long)."""

    def __init__(self, max_frames, max_bytes, period):
        self.max_frames, self.max_bytes, self.period = max_frames, max_bytes, period
        self._since, self._frames, self._bytes, self._sparse = time.monotonic(), 0, 0, True

    def sparse(self, frames, nbytes, now):
        """Whether traffic is sparse, given the frames and bytes moved so far (totals
        that only grow) at ``now`` (a monotonic time)."""
        elapsed = now - self._since
        if elapsed >= self.period:
            self._sparse = (frames - self._frames < self.max_frames * elapsed
                            and nbytes - self._bytes < self.max_bytes * elapsed)
            self._since, self._frames, self._bytes = now, frames, nbytes
        return self._sparse


# The signals that stop vhostpath cleanly: SIGHUP too (the terminal or the ssh
# session gone), which would otherwise kill it with the host left changed.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _ifreq(name, flags=0):
    req = ifreq()
    req.ifr_name = name.encode()
    req.ifr_ifru.ifru_flags = flags
    return req


def _ifname_valid(name):
    """Whether ``name`` can name a network interface (dev_valid_name in
    net/core/dev.c): 1 to 15 bytes, not "." or "..", no "/", ":" or white space.
    Names reach paths (/proc/sys/net/..., the records under STATE_DIR)."""
    return (0 < len(name.encode()) < IFNAMSIZ and name not in (".", "..")
            and not any(c in "/:" or c.isspace() for c in name))


def _tap_name_valid(name):
    """Whether ``name`` can name a new tap: an interface name, or a template the
    kernel completes, with one "%d" and no other "%" (dev_alloc_name)."""
    _, percent, tail = name.partition("%")
    return (_ifname_valid(name)
            and (not percent or tail.startswith("d") and "%" not in tail))


def _sysctl_swap(path, value):
    """Write ``value`` to a /proc/sys file; return the old value, or None if absent."""
    try:
        with open(path, "r+") as f:
            old = f.read().strip()
            f.seek(0)
            f.write(value)
        return old
    except FileNotFoundError:
        return None


def _sysctl_read(path):
    """The value in a /proc/sys file, or None if absent."""
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _net_sysctl(template, iface):
    """The /proc/sys/net file of ``template`` ("{}" for the interface's name) for ``iface``."""
    return "/proc/sys/net/" + template.format(iface)


class _MsgBatch:
    """Preallocated mmsghdr and iovec arrays for one sendmmsg(2)/recvmmsg(2) call.

    ``count`` messages of up to ``segs`` iovecs each, and ``control`` bytes
    of control messages each when received.  The arrays live in bytearrays
    filled with struct.pack_into: no Python object per packet.
    """

    _IOV = struct.Struct("QQ")

    def __init__(self, count, segs, control=0):
        self.count, self.segs, self.control = count, segs, control
        self.msgs = bytearray(count * ctypes.sizeof(mmsghdr))
        self.iovs = bytearray(count * segs * ctypes.sizeof(iovec))
        self.ctrl = bytearray(max(1, count * control))
        self._anchors = (ctypes.c_char.from_buffer(self.msgs),
                         ctypes.c_char.from_buffer(self.iovs),
                         ctypes.c_char.from_buffer(self.ctrl))
        self.msgs_addr, iovs_addr, ctrl_addr = map(ctypes.addressof, self._anchors)
        self._msg_size, self._iov_size = ctypes.sizeof(mmsghdr), ctypes.sizeof(iovec)
        self._ctrl_len_off = msghdr.msg_controllen.offset
        if control:
            for j in range(count):
                struct.pack_into("Q", self.msgs, j * self._msg_size + msghdr.msg_control.offset,
                                 ctrl_addr + j * control)
        self._iov_off, self._len_off = msghdr.msg_iov.offset, msghdr.msg_iovlen.offset
        self._flags_off = msghdr.msg_flags.offset
        # msg_flags and msg_len in one unpack (x86-64: at 48 and 56).
        self._result = struct.Struct(f"I{mmsghdr.msg_len.offset - self._flags_off - 4}xI")
        for j in range(count):
            struct.pack_into("Q", self.msgs, j * self._msg_size + self._iov_off,
                             iovs_addr + j * segs * self._iov_size)
        libc = _libc()
        self._sendmmsg, self._recvmmsg = libc.sendmmsg, libc.recvmmsg
        self._sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
        self._recvmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                                   ctypes.c_void_p)

    def set_iov(self, j, segments):
        """Message ``j`` gathers/scatters ``segments``: (address, length) pairs."""
        off = j * self.segs * self._iov_size
        for addr, length in segments:
            self._IOV.pack_into(self.iovs, off, addr, length)
            off += self._iov_size
        struct.pack_into("Q", self.msgs, j * self._msg_size + self._len_off, len(segments))

    def set_iov_bytes(self, j, raw):
        """Message ``j`` uses ``raw``: iovec entries already packed."""
        off = j * self.segs * self._iov_size
        self.iovs[off:off + len(raw)] = raw
        struct.pack_into("Q", self.msgs, j * self._msg_size + self._len_off,
                         len(raw) // self._iov_size)

    def result(self, j):
        """(msg_flags, bytes) the kernel reported for message ``j``."""
        return self._result.unpack_from(self.msgs, j * self._msg_size + self._flags_off)

    def sendmmsg(self, fd, n):
        """Send messages 0..n-1 without blocking; return how many went (OSError if none)."""
        sent = self._sendmmsg(fd, self.msgs_addr, n, MSG_DONTWAIT)
        if sent < 0:
            raise _libc_error("sendmmsg")
        return sent

    def control_data(self, j):
        """Message ``j``'s control messages, as received (a memoryview)."""
        length, = struct.unpack_from("Q", self.msgs, j * self._msg_size + self._ctrl_len_off)
        return memoryview(self.ctrl)[j * self.control:j * self.control + length]

    def recvmmsg(self, fd, n):
        """Receive into messages 0..n-1 without blocking; return how many (OSError if none)."""
        if self.control:                # the kernel set each msg_controllen to what it used
            for j in range(n):
                struct.pack_into("Q", self.msgs, j * self._msg_size + self._ctrl_len_off,
                                 self.control)
        got = self._recvmmsg(fd, self.msgs_addr, n, MSG_DONTWAIT, None)
        if got < 0:
            raise _libc_error("recvmmsg")
        return got


class _Barrier:
    """A full memory barrier (the kernel's virtio_mb), callable from Python.

    x86-64 is TSO: stores become visible in program order and loads are not
    reordered with loads, so desc -> avail ring entry -> avail->idx needs no
    fence.  A later *load* may still pass an earlier *store* though, and the
    kick decision (store avail->idx, then load used->flags) is exactly that
    pattern: without a fence both sides could miss each other and the device
    would sleep on a non-empty ring.  CPython has no fence, so a 4-byte
    function (``mfence; ret``, or ``dmb ish; ret`` on arm64) is placed in an
    executable page.  Where that is impossible (another CPU, or W^X policy),
    ``available`` is False and callers must kick unconditionally.  arm64 is
    not TSO: there the same barrier also orders the stores before avail->idx
    and the loads after used->idx (``_TSO`` False).
    """

    _CODE = {
        "x86_64": b"\x0f\xae\xf0\xc3",                      # mfence; ret
        "aarch64": bytes.fromhex("bf3b03d5c0035fd6"),       # dmb ish; ret
    }

    def __init__(self):
        self.available = False
        self._fn = None
        code = self._CODE.get(platform.machine())
        if code is None:
            return
        try:
            self._page = mmap.mmap(-1, mmap.PAGESIZE)
            self._page.write(code)
            self._anchor = ctypes.c_char.from_buffer(self._page)
            addr = ctypes.addressof(self._anchor)
            libc = _libc()
            libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            if libc.mprotect(addr, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
                return
        except (OSError, AttributeError):
            return
        self._fn = ctypes.CFUNCTYPE(None)(addr)
        self.available = True

    def __call__(self):
        self._fn()


_barrier = None
_TSO = platform.machine() in ("x86_64", "AMD64", "i386", "i686")   # program-order stores/loads


def _full_barrier():
    """The process-wide _Barrier, made on first use (importing touches nothing)."""
    global _barrier
    if _barrier is None:
        _barrier = _Barrier()
    return _barrier


########################################################################################
# virtio-net features, header and buffer sizes
########################################################################################


def vnet_hdr_len(features):
    """Size of the virtio-net header for the negotiated features (virtio spec 5.1.6).

    12 (with num_buffers) when MRG_RXBUF or VERSION_1 is negotiated, else 10.
    Both the tap (TUNSETVNETHDRSZ) and the buffer layout use this.
    """
    if features & (1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_F_VERSION_1):
        return VIRTIO_NET_HDR_MRG_RXBUF_LEN
    return VIRTIO_NET_HDR_LEN


# Feature names for -v (linux/virtio_net.h, virtio_config.h, virtio_ring.h).
FEATURE_NAMES = {
    VIRTIO_NET_F_CSUM: "CSUM", VIRTIO_NET_F_GUEST_CSUM: "GUEST_CSUM",
    VIRTIO_NET_F_GUEST_TSO4: "GUEST_TSO4", VIRTIO_NET_F_GUEST_TSO6: "GUEST_TSO6",
    VIRTIO_NET_F_HOST_TSO4: "HOST_TSO4", VIRTIO_NET_F_HOST_TSO6: "HOST_TSO6",
    VIRTIO_NET_F_MRG_RXBUF: "MRG_RXBUF", VIRTIO_NET_F_GUEST_USO4: "GUEST_USO4",
    VIRTIO_NET_F_GUEST_USO6: "GUEST_USO6", VIRTIO_F_NOTIFY_ON_EMPTY: "NOTIFY_ON_EMPTY",
    VIRTIO_F_ANY_LAYOUT: "ANY_LAYOUT", VIRTIO_RING_F_INDIRECT_DESC: "INDIRECT_DESC",
    VIRTIO_RING_F_EVENT_IDX: "EVENT_IDX", VIRTIO_F_VERSION_1: "VERSION_1",
    VIRTIO_F_ACCESS_PLATFORM: "ACCESS_PLATFORM",
}
TUN_F_NAMES = {TUN_F_CSUM: "CSUM", TUN_F_TSO4: "TSO4", TUN_F_TSO6: "TSO6", TUN_F_USO4: "USO4",
               TUN_F_USO6: "USO6"}


def feature_names(features):
    """'MRG_RXBUF GUEST_CSUM ...' for a feature mask (unknown bits as bitNN)."""
    return " ".join(FEATURE_NAMES.get(b, f"bit{b}") for b in range(64) if features >> b & 1)


def offload_features(rx_cksum, lro):
    """The virtio-net offload bits the driver negotiates with the tap (not with vhost).

    The tap always accepts partial checksums and GSO frames from us (CSUM,
    HOST_TSO4/6).  GUEST_CSUM lets the kernel hand us partial checksums;
    large receive (LRO), which needs it, 64 KB TCP segments (GUEST_TSO4/6)
    and UDP GSO super-frames (GUEST_USO4/6, where the tap takes TUN_F_USO4/6:
    Linux 6.2; see Tap.set_virtio_net).
    """
    if lro and not rx_cksum:
        raise VhostPathError("LRO needs rx checksum offload (the kernel refuses TSO "
                             "without it)")
    bits = 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6
    if rx_cksum:
        bits |= 1 << VIRTIO_NET_F_GUEST_CSUM
    if lro:
        bits |= 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6
        bits |= 1 << VIRTIO_NET_F_GUEST_USO4 | 1 << VIRTIO_NET_F_GUEST_USO6
    return bits


# What only some kernels' taps take: (feature bit, TUNSETOFFLOAD flag).
USO_OFFLOADS = ((VIRTIO_NET_F_GUEST_USO4, TUN_F_USO4), (VIRTIO_NET_F_GUEST_USO6, TUN_F_USO6))


def tap_offloads(features):
    """TUNSETOFFLOAD flags for negotiated features: what the kernel may hand us."""
    flags = TUN_F_CSUM if features >> VIRTIO_NET_F_GUEST_CSUM & 1 else 0
    if flags and features >> VIRTIO_NET_F_GUEST_TSO4 & 1:
        flags |= TUN_F_TSO4
    if flags and features >> VIRTIO_NET_F_GUEST_TSO6 & 1:
        flags |= TUN_F_TSO6
    for bit, flag in USO_OFFLOADS:
        if flags and features >> bit & 1:
            flags |= flag
    return flags


def tap_offload_names(flags):
    """'CSUM TSO4 ...' for TUNSETOFFLOAD flags, or 'none'."""
    return " ".join(name for flag, name in TUN_F_NAMES.items() if flags & flag) or "none"


# Buffer sizes.  The largest frame either side carries: a 64 KB GSO super-frame
# (the kernel's gso_max_size) with an Ethernet header and one VLAN tag.
MAX_FRAME = 65536 + ETH_HLEN + VLAN_HLEN
# VirtioUserPort: RX_BUF_SIZE bytes for what the kernel sends, TX_BUF_SIZE for
# what the NIC sends.  A larger packet from the kernel spans several RX buffers
# (MRG_RXBUF, num_buffers).  A larger frame from the NIC is received into a TX
# buffer and, past its end, into a spill area big enough for the rest,
# chained as a second descriptor.  So a big frame costs 2 TX descriptors or
# 9 RX buffers, and no ring buffer is 64 KB.
RX_BUF_SIZE = 8192
TX_BUF_SIZE = 2048
MAX_RX_BUFS = -(-(VIRTIO_NET_HDR_MRG_RXBUF_LEN + MAX_FRAME) // RX_BUF_SIZE)  # of a 64 KB packet
SPILL_SIZE = 65536                       # >= header + MAX_FRAME - TX_BUF_SIZE
SPILLS = 32                              # big frames in flight towards the kernel
MIN_QUEUE_SIZE = 64                      # room for MAX_RX_BUFS, and then some
SEND_BATCH = 64                          # packets per sendmmsg(2) towards the NIC
RECV_BATCH = 16                          # packets per recvmmsg(2) from the NIC
# VhostBridge: a packet socket's virtio-net header is 10 bytes before Linux 6.4
# (PACKET_VNET_HDR_SZ), so there the tap device cannot merge RX buffers and every
# buffer towards the NIC holds a whole frame (VHOST_BUF_SIZE, page-rounded: an
# MTU-sized frame touches one page of it, so memory is committed only where
# large frames have been).  From 6.4 the header is 12 bytes, the tap device
# merges MERGED_BUF_SIZE buffers and the NIC TX ring carries them chained: 16 KB,
# so a 64 KB packet takes 5 (Python handles each buffer of a chain; with 4 KB
# pages, 17 of them, TCP outwards with LRO ran 44 % slower in one 6.12 boot).
# Either way a frame from the NIC too big for its packet ring slot is received
# into one of SPILLS whole-frame areas, room for a VLAN tag in front.
VHOST_BUF_SIZE = _page_round(VLAN_HLEN + VIRTIO_NET_HDR_MRG_RXBUF_LEN + MAX_FRAME)
MERGED_BUF_SIZE = 16384
NIC_RING_BYTES = 4 << 20                 # the packet receive ring: a burst's worth
# VhostBridge: a batch of at most DIRECT_BATCH frames while neither TX ring has
# anything in flight is written straight to the tap or sent on the packet
# socket, one system call each, instead of waking a vhost worker: a ping's round
# trip then wakes two threads fewer.  Frames in flight keep the vhost path, so
# frames never overtake each other, and bulk traffic keeps its zero-copy batches
# and leaves the stack's work to the vhost workers (a TCP ACK written from here
# makes the kernel send the next segments in this process's system call): with
# the destination ring alone checked, TCP moved 2-11 % less at 26 % more CPU per
# GB in one boot.
DIRECT_BATCH = 4
# VhostBridge: while neither TX ring has a frame in flight, the tap's RX vring
# has no backend (VHOST_NET_SET_BACKEND -1): this process sleeps on the tap's
# readiness (tun_chr_poll) and reads what the kernel sends itself, a frame at a
# time, onto the packet socket, so a ping's round trip wakes this process once
# and no vhost worker.  DIRECT_BATCH frames read in one pass, or a pass that
# puts frames on a TX ring, bind the ring to the worker again, which takes the
# rest of the tap's queue in order; it is unbound once TAP_BIND_HOLD seconds
# pass without such a pass and without a run of frames the worker moved (poll()
# wakes for it).  Unbinding waits for the worker (vhost_dev_flush), so bulk traffic
# does not pay that at every pause, and it is never done under traffic: the
# frames vhost took ahead go back to the tap's queue, and those a full queue
# has no room for are freed (ptr_ring_unconsume).
TAP_BIND_HOLD = 0.05
# VhostBridge: how long a frame read from the tap waits for room in the packet
# socket's send buffer (its memory comes back as the NIC sends earlier frames:
# at 1 Gb/s the default 208 KB in 1.7 ms) before it is dropped and counted; it
# is out of the tap, with no ring to wait in.
NIC_SEND_WAIT = 0.01
# Busy-polling (--busy-poll) pays while traffic is sparse (requests and answers,
# pings): without it each frame finds the process asleep.  Bulk traffic keeps the
# process awake without it, and there a spinning process takes CPU the rest of
# the path needs (TCP in was 20-35 % lower on 2 vCPUs): so a forwarder spins only
# while its NIC moved fewer than BUSY_POLL_MAX_FRAMES frames and BUSY_POLL_MAX_BYTES
# bytes a second, both ways, over BUSY_POLL_PERIOD seconds.  Bytes too, as bulk
# TCP with LRO moves 64 KB frames: a few thousand a second.  (A request/response
# flow moves 2 frames a round trip.)
BUSY_POLL_MAX_FRAMES = 10000
BUSY_POLL_MAX_BYTES = 10 << 20
BUSY_POLL_PERIOD = 0.01
SPARSE_TRAFFIC = f"under {BUSY_POLL_MAX_FRAMES} frames and {BUSY_POLL_MAX_BYTES >> 20} MB a second"


########################################################################################
# Shared memory: the arena handed to the kernel
########################################################################################


class Arena:
    """One page-aligned anonymous mmap holding rings and packet buffers.

    It is registered with VHOST_SET_MEM_TABLE as a single identity-mapped
    region (guest-physical address == user virtual address), so descriptor
    addresses are plain pointers.  The kernel keeps raw addresses into it:
    the arena must outlive every vhost fd that uses it.

    Its pages are small ones (MADV_NOHUGEPAGE): with transparent huge pages the
    first write into each 2 MB, often a vhost worker's copy of one packet into
    a buffer it had not used yet, would wait for 2 MB to be zeroed (20 ms of a
    TCG guest's CPU, every 30 buffers of the first pass over the pool), and a
    quiet bridge would hold 2 MB for each few bytes it used.
    """

    def __init__(self, size):
        self.size = _page_round(size)
        self.mm = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._anchor = ctypes.c_char.from_buffer(self.mm)
        self.addr = ctypes.addressof(self._anchor)
        _no_huge_pages(self.mm, self.addr, self.size)
        self.view = memoryview(self.mm)

    def region(self):
        """The vhost_memory_region that maps the whole arena."""
        return vhost_memory_region(guest_phys_addr=self.addr, memory_size=self.size,
                                   userspace_addr=self.addr, flags_padding=0)

    def close(self):
        """Unmap; only after every vhost fd using the arena is closed."""
        if self.mm is not None:
            self.view.release()
            del self._anchor
            self.mm.close()
            self.mm = None

    def __repr__(self):
        return f"<Arena {self.size} bytes at {self.addr:#x}>"


########################################################################################
# Split virtqueue (virtio 1.x spec, section 2.7; the legacy layout of linux/virtio_ring.h)
########################################################################################


def vring_layout(num):
    """Offsets of a split ring of ``num`` entries: (desc, avail, used, total size).

    Standard layout: the descriptor table, the avail ring right after it, the
    used ring at the next VRING_ALIGN boundary; both rings carry a trailing
    event index word.
    """
    if num < 1 or num > VIRTQUEUE_MAX_SIZE or num & (num - 1):
        raise ValueError(f"queue size must be a power of two from 1 to {VIRTQUEUE_MAX_SIZE}, "
                         f"not {num}")
    desc = 0
    avail = desc + ctypes.sizeof(vring_desc) * num
    used = (avail + 4 + 2 * num + 2 + VRING_ALIGN - 1) // VRING_ALIGN * VRING_ALIGN
    return desc, avail, used, used + 4 + ctypes.sizeof(vring_used_elem) * num + 2


class SplitVirtqueue:
    """The driver side of one split virtqueue whose memory lives in an Arena.

    Every descriptor ``i`` owns buffer ``i`` (``buf_size`` bytes) for the life
    of the queue, so a descriptor id is also a buffer index.  A packet larger
    than one buffer travels as a descriptor chain (``add_chain``).  Vocabulary
    as in Linux's virtio_ring.c: ``add_buf`` / ``add_chain`` / ``kick_prepare``
    / ``notify`` / ``get_buf``, which track which descriptors the device owns.
    A ring that only ever carries single whole buffers may use the batch
    forms ``add_bufs`` / ``add_run`` / ``get_run`` instead, which check bounds
    and counts per run.  Each used entry is bounds-checked; a device that
    breaks the rules makes the ring broken (sticky) and raises RingBrokenError.

    ``event_idx``: VIRTIO_RING_F_EVENT_IDX was negotiated (spec 2.7.7, 2.7.10):
    kicks and interrupts are then asked for by index (avail_event, used_event)
    instead of by flag, so ``enable_cb_delayed`` can ask for one interrupt per
    many used entries.  It needs the full barrier (see _Barrier).
    """

    def __init__(self, arena, ring_offset, buf_offset, num, buf_size, device_writes, kickfd,
                 event_idx=False):
        if not _TSO and not _full_barrier().available:
            raise VhostPathError(f"no memory barrier for {platform.machine()}: the rings "
                                 "shared with the kernel cannot be ordered")
        self.num = num
        self.buf_size = buf_size
        self.kickfd = kickfd
        self.broken = False
        self.event_idx = event_idx
        if event_idx and not _full_barrier().available:
            raise VhostPathError("VIRTIO_RING_F_EVENT_IDX needs a full memory barrier")
        d, a, u, _ = vring_layout(num)
        base = arena.addr + ring_offset
        self.desc_addr, self.avail_addr, self.used_addr = base + d, base + a, base + u
        view = arena.view
        # ctypes overlay for one-time set-up; flat memoryview casts for the hot path.
        desc = (vring_desc * num).from_buffer(arena.mm, ring_offset + d)
        self._flags = VRING_DESC_F_WRITE if device_writes else 0
        for i in range(num):
            desc[i].addr = arena.addr + buf_offset + i * buf_size
            desc[i].len = buf_size
            desc[i].flags = self._flags
        del desc
        self._desc_u64 = view[ring_offset + d:ring_offset + a].cast("Q")   # addr: 2i
        self._desc_u16 = view[ring_offset + d:ring_offset + a].cast("H")   # flags: 8i+6, next: 8i+7
        self._desc_u32 = view[ring_offset + d:ring_offset + a].cast("I")   # len: 4i+2
        # avail: flags, idx, ring[num], used_event (we write); used: flags, idx,
        # ring[num] of (id, len), avail_event (the device writes).
        self._avail = view[ring_offset + a:ring_offset + a + 6 + 2 * num].cast("H")
        self._used_hdr = view[ring_offset + u:ring_offset + u + 4].cast("H")
        self._used_ring = view[ring_offset + u + 4:ring_offset + u + 4 + 8 * num].cast("I")
        self._avail_event = view[ring_offset + u + 4 + 8 * num:
                                 ring_offset + u + 6 + 8 * num].cast("H")
        self.bufs = [view[buf_offset + i * buf_size:buf_offset + (i + 1) * buf_size]
                     for i in range(num)]
        self.avail_idx_shadow = 0        # our next avail->idx (free running u16)
        self.last_used_idx = 0           # next used entry to read
        self.num_added = 0               # entries added since the last kick_prepare
        self.owned = [0] * num           # per head the device owns: bytes offered, else 0
        self.chains = [None] * num       # per head: the ids add_chain last chained there
        self._free = list(range(num - 1, -1, -1))   # descriptors no one holds
        self._buf_base = arena.addr + buf_offset
        # Descriptor ids 0 .. num-1 in the used ring's type (u32) and the avail
        # ring's (u16): runs of ids are compared and stored as slices of these.
        self._ids32 = memoryview(array.array("I", range(num)))
        self._ids16 = memoryview(array.array("H", range(num)))
        self._run_lengths = memoryview(array.array("I", bytes(4 * num)))    # get_run's

    def num_free(self):
        """How many descriptors are free (see take_free)."""
        return len(self._free)

    def take_free(self, count):
        """Take up to ``count`` free descriptors (their ids) to fill and offer; give back
        those not offered with put_free."""
        free = self._free
        ids = free[max(0, len(free) - count):]
        del free[len(free) - len(ids):]
        return ids

    def put_free(self, ids):
        """Give descriptors back: not offered after take_free, or used (a chain
        get_buf returned, ``chains[head]``)."""
        self._free.extend(ids)

    def buf_addr(self, desc_id):
        """The address of descriptor ``desc_id``'s own buffer."""
        return self._buf_base + desc_id * self.buf_size

    def set_addr(self, desc_id, addr):
        """Point a free descriptor at other arena memory (restore with buf_addr)."""
        self._desc_u64[desc_id * 2] = addr

    def set_addrs(self, first, addrs):
        """Point free descriptors ``first``, ``first + 1``, ... (wrapping at num) at
        ``addrs``, a memoryview of u64 ("Q")."""
        n, num = len(addrs), self.num
        k = min(n, num - first)
        self._desc_u64[2 * first:2 * (first + k):2] = addrs[:k]
        self._desc_u64[0:2 * (n - k):2] = addrs[k:]

    def _add_head(self, head, capacity):
        # Virtio spec 2.7.13: descriptors first, then the avail ring entry; the
        # index is published by kick_prepare.  On x86-64 (TSO) these plain
        # stores reach the device in program order, so no fence is needed.
        self._avail[2 + (self.avail_idx_shadow & (self.num - 1))] = head
        self.avail_idx_shadow = (self.avail_idx_shadow + 1) & 0xFFFF
        self.owned[head] = capacity
        self.num_added += 1

    def add_buf(self, desc_id, length):
        """Offer the single descriptor ``desc_id`` holding or accepting ``length`` bytes."""
        self._desc_u32[desc_id * 4 + 2] = length
        self._add_head(desc_id, length)

    def add_bufs(self, ids, lengths=None):
        """Offer single descriptors ``ids`` at once, ``lengths[k]`` bytes each, or whole
        buffers (the length they were offered with before) when ``lengths`` is None.

        For rings used only through add_bufs / add_run / get_run: no
        per-descriptor ownership is kept; get_run checks bounds and counts
        instead.
        """
        n, num, avail = len(ids), self.num, self._avail
        if lengths is not None:
            for desc_id, length in zip(ids, lengths):
                self._desc_u32[desc_id * 4 + 2] = length
        # Descriptors first, then the avail ring entries (see _add_head).
        start = self.avail_idx_shadow & (num - 1)
        first = min(n, num - start)
        avail[2 + start:2 + start + first] = array.array("H", ids[:first])
        avail[2:2 + n - first] = array.array("H", ids[first:])
        self.avail_idx_shadow = (self.avail_idx_shadow + n) & 0xFFFF
        self.num_added += n

    def add_run(self, first, count, lengths=None):
        """add_bufs for the ``count`` descriptors ``first``, ``first + 1``, ... (wrapping
        at num), with slice stores instead of a loop: ``lengths`` is a u32
        buffer of ``count`` lengths (a run from get_run), or None for whole
        buffers.  Order as in _add_head: each piece's descriptors, then its
        avail entries."""
        num, d32, avail, ids = self.num, self._desc_u32, self._avail, self._ids16
        start, done = self.avail_idx_shadow & (num - 1), 0
        while done < count:             # pieces wrapping neither the ids nor the avail ring
            i, a = (first + done) & (num - 1), (start + done) & (num - 1)
            k = min(count - done, num - i, num - a)
            if lengths is not None:
                d32[4 * i + 2:4 * (i + k):4] = lengths[done:done + k]
            avail[2 + a:2 + a + k] = ids[i:i + k]
            done += k
        self.avail_idx_shadow = (self.avail_idx_shadow + count) & 0xFFFF
        self.num_added += count

    def add_chain(self, ids, length):
        """Offer descriptors ``ids`` chained (VRING_DESC_F_NEXT), holding ``length`` bytes."""
        d16, d32, size = self._desc_u16, self._desc_u32, self.buf_size
        last = ids[-1]
        for desc_id, nxt in zip(ids, ids[1:]):
            d32[desc_id * 4 + 2] = size
            d16[desc_id * 8 + 6] = self._flags | VRING_DESC_F_NEXT
            d16[desc_id * 8 + 7] = nxt
        d32[last * 4 + 2] = length - size * (len(ids) - 1)
        d16[last * 8 + 6] = self._flags
        self.chains[ids[0]] = ids
        self._add_head(ids[0], length)

    def unchain(self, ids):
        """Descriptors of a used chain single again (their set-up flags, no NEXT), for a
        ring that offers them with add_bufs / add_run next."""
        for desc_id in ids:
            self._desc_u16[desc_id * 8 + 6] = self._flags

    def kick_prepare(self):
        """Publish avail->idx; return True if the device wants a kick: NO_NOTIFY clear,
        or with event_idx, avail->idx moved past avail_event (vring_need_event)."""
        if not self.num_added:
            return False
        new, old = self.avail_idx_shadow, (self.avail_idx_shadow - self.num_added) & 0xFFFF
        self.num_added = 0
        barrier = _full_barrier()
        if not _TSO:
            barrier()                             # entries before avail->idx (virtio_wmb)
        self._avail[1] = new                      # after the entries: TSO keeps the order
        if not barrier.available:
            return True
        barrier()                                 # avail->idx store before the device's word
        if self.event_idx:
            return (new - self._avail_event[0] - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self._used_hdr[0] & VRING_USED_F_NO_NOTIFY

    def notify(self):
        """Kick: signal the kick eventfd (8-byte counter increment)."""
        os.write(self.kickfd, b"\x01\0\0\0\0\0\0\0")

    def kick(self):
        """kick_prepare + notify."""
        if self.kick_prepare():
            self.notify()

    def disable_cb(self):
        """Tell the device no interrupt is needed (a hint), as Linux's virtqueue_disable_cb:
        VRING_AVAIL_F_NO_INTERRUPT, or with event_idx a used_event one behind
        the entries taken, which used->idx reaches only after going round.

        Without a full barrier enable_cb could miss an entry, so then
        interrupts stay on.
        """
        if self.event_idx:
            self._avail[2 + self.num] = (self.last_used_idx - 1) & 0xFFFF
        elif _full_barrier().available:
            self._avail[0] = VRING_AVAIL_F_NO_INTERRUPT

    def enable_cb(self):
        """Ask for an interrupt at the next used entry; False if used entries are
        pending already.

        Those may have come before the device saw the request, without an
        interrupt: the caller takes them first (virtqueue_enable_cb).
        """
        if self.event_idx:
            return self._used_event_at(0)
        if self._avail[0]:
            self._avail[0] = 0
            _full_barrier()()                     # flags store before the used->idx load
        return not self.used_pending()

    def enable_cb_delayed(self):
        """Ask for one interrupt once about 3/4 of the entries in flight are used;
        False if that many are used already (virtqueue_enable_cb_delayed).

        Only safe where every entry in flight will be used without outside
        help (a TX ring).  Without event_idx it is enable_cb.
        """
        if self.event_idx:
            return self._used_event_at(self.in_flight() * 3 // 4)
        return self.enable_cb()

    def _used_event_at(self, count):
        # Spec 2.7.10: the device interrupts when used->idx passes used_event.
        self._avail[2 + self.num] = (self.last_used_idx + count) & 0xFFFF
        _full_barrier()()                         # used_event store before the used->idx load
        return self.used_pending() <= count

    def in_flight(self):
        """Entries offered to the device and not yet taken back."""
        return (self.avail_idx_shadow - self.last_used_idx) & 0xFFFF

    def used_pending(self):
        """How many used entries the device has published that we have not consumed."""
        if self.broken:
            raise RingBrokenError("virtqueue is broken")
        n = (self._used_hdr[1] - self.last_used_idx) & 0xFFFF
        if n > self.num:
            self.mark_broken(f"used->idx moved by {n} entries, more than the ring's {self.num}")
        if n and not _TSO:
            _full_barrier()()                     # used->idx before the entries (virtio_rmb)
        return n

    def peek_used(self, k=0):
        """The k-th unconsumed used entry (head id, length), checked, left on the ring."""
        slot = (self.last_used_idx + k) & (self.num - 1)
        desc_id, length = self._used_ring[2 * slot], self._used_ring[2 * slot + 1]
        if desc_id >= self.num or not self.owned[desc_id]:
            self.mark_broken(f"used id {desc_id} is not a descriptor the device owns")
        if length > self.owned[desc_id]:
            self.mark_broken(f"used len {length} exceeds the {self.owned[desc_id]} bytes "
                             f"offered in descriptor {desc_id}")
        return desc_id, length

    def consume_used(self, desc_id):
        """Consume the next used entry, which peek_used showed to hold ``desc_id``."""
        if not self.owned[desc_id]:
            self.mark_broken(f"used id {desc_id} published twice")
        self.owned[desc_id] = 0
        self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF

    def get_buf(self):
        """Take the next used entry: (head id, length written)."""
        desc_id, length = self.peek_used()
        self.consume_used(desc_id)
        return desc_id, length

    def get_run(self, min_len=0):
        """Take the next used entries that hold consecutive descriptor ids: (first id,
        count, lengths); None if no entry is pending.  ``lengths``, the bytes
        the device wrote, is a u32 memoryview valid until the next get_run; None
        for a ring the device only reads, whose used lengths mean nothing (vhost
        writes 0) and are not read.

        For add_bufs / add_run rings, checked per run: no more entries than
        offered, ids of this ring, and on a ring the device writes every
        length from ``min_len`` to a buffer.
        vhost-net uses single buffers in the order they were offered, so a
        ring offered in order gives them back as one long run, found with one
        slice compare and passed on with add_run.  A run ends at the end of
        the used ring or of the descriptor table, or where the ids stop
        following each other.  The entries are read after used->idx (x86-64
        keeps loads in order; elsewhere used_pending fences).
        """
        n = self.used_pending()
        if not n:
            return None
        if n > self.in_flight():
            self.mark_broken(f"{n} used entries, but only {self.in_flight()} offered")
        num, ring = self.num, self._used_ring
        slot = self.last_used_idx & (num - 1)
        first = ring[2 * slot]
        if first >= num:
            self.mark_broken(f"used id {first} is not a descriptor of this ring")
        k = min(n, num - slot, num - first)
        # Views of the arena are released at once: none may outlive close().
        with ring[2 * slot:2 * (slot + k):2] as ids:
            if ids != self._ids32[first:first + k]:     # used out of order: the run before
                k = 1
                while k < len(ids) and ids[k] == first + k:    # shared: may have changed
                    k += 1
        lengths = None
        if self._flags:
            lengths = self._run_lengths[:k]
            with ring[2 * slot + 1:2 * (slot + k):2] as used_lengths:
                lengths[:] = used_lengths       # checked below, then used: one read
            if max(lengths) > self.buf_size:
                self.mark_broken(f"used len {max(lengths)} exceeds the "
                                 f"{self.buf_size}-byte buffers")
            if min(lengths) < min_len:
                self.mark_broken(f"used len {min(lengths)} is shorter than {min_len} bytes")
        self.last_used_idx = (self.last_used_idx + k) & 0xFFFF
        return first, k, lengths

    def close(self):
        """Release every view into the arena, so that the arena can be unmapped."""
        for view in (self._desc_u64, self._desc_u16, self._desc_u32, self._avail, self._used_hdr,
                     self._used_ring, self._avail_event, *self.bufs):
            view.release()

    def mark_broken(self, why):
        """The device broke the rules: the ring is unusable from now on (sticky).
        Raises RingBrokenError naming ``why``."""
        self.broken = True
        raise RingBrokenError(f"virtqueue broken: {why}")


########################################################################################
# rtnetlink: links and addresses, and the link changes the kernel announces
########################################################################################

NETNS_DIR = "/run/netns"                 # where iproute2 keeps named network namespaces


def _setns(fd):
    """setns(2) into the network namespace ``fd`` (this thread only): os.setns where
    Python has it (3.12+), else the C library's."""
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
    elif _libc().setns(fd, CLONE_NEWNET) != 0:
        raise _libc_error("setns")


def _netns_fd(name):
    """An fd of the named network namespace (``ip netns add NAME``)."""
    try:
        return os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VhostPathError(f"no network namespace {name} (create it with 'ip netns add "
                             f"{name}')") from None


def _in_netns(name, function, *args):
    """``function(*args)`` called in the named network namespace (None: this one);
    what it opens there (a socket, a /proc/sys/net file) belongs to that
    namespace.  This thread returns to its own."""
    if name is None:
        return function(*args)
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        there = _netns_fd(name)
        try:
            _setns(there)
            try:
                return function(*args)
            finally:
                _setns(here)
        finally:
            os.close(there)
    finally:
        os.close(here)


def socket_in_netns(name, *args):
    """socket.socket(*args) made in the named network namespace (None: this one); a
    socket stays in the namespace it was made in."""
    return _in_netns(name, socket.socket, *args)


class Link:
    """A link as RTM_NEWLINK describes it: ``index``, ``name``, ``flags`` (IFF_*),
    ``mtu``, ``operstate`` (IF_OPER_*) and ``address`` (bytes); or ``gone``
    from this namespace (RTM_DELLINK), ``moved`` to another one if so."""

    def __init__(self, kind, body):
        info = ifinfomsg.from_buffer_copy(body)
        attrs = Rtnl.attributes(body[ctypes.sizeof(ifinfomsg):])
        self.gone = kind == RTM_DELLINK
        self.moved = self.gone and IFLA_NEW_NETNSID in attrs
        self.index, self.flags = info.ifi_index, info.ifi_flags
        self.name = attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode()
        self.mtu = struct.unpack("I", attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else None
        self.operstate = attrs.get(IFLA_OPERSTATE, bytes([IF_OPER_UNKNOWN]))[0]
        self.address = attrs.get(IFLA_ADDRESS)

    @property
    def running(self):
        """Up and able to carry frames: the kernel's netif_oper_up() on an IFF_UP link."""
        return bool(self.flags & IFF_UP) and self.operstate in (IF_OPER_UP, IF_OPER_UNKNOWN)

    def __repr__(self):
        state = "gone" if self.gone else "running" if self.running else "not running"
        return f"<Link {self.index} {self.name} mtu={self.mtu} {state}>"


class Rtnl(_Closing):
    """A NETLINK_ROUTE socket in a network namespace (``netns``, a name ``ip netns``
    knows, or None for this one).

    With ``groups`` 0 it makes requests, each acknowledged (NLM_F_ACK) and a
    refusal raised as OSError with the kernel's errno.  With ``groups``
    (RTMGRP_LINK) it is non-blocking and ``links()`` reads the changes the
    kernel announced; poll its ``fileno()`` for POLLIN.
    """

    _HDR, _ATTR = ctypes.sizeof(nlmsghdr), ctypes.sizeof(rtattr)

    def __init__(self, netns=None, groups=0):
        self.sock = socket_in_netns(netns, socket.AF_NETLINK,
                                    socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            self.sock.bind((0, groups))
            self.sock.setblocking(not groups)
        except BaseException:
            self.sock.close()
            raise
        self._seq = 0

    @classmethod
    def attributes(cls, data):
        """{type: data} of the rtattrs in ``data``."""
        attrs, off = {}, 0
        while off + cls._ATTR <= len(data):
            head = rtattr.from_buffer_copy(data, off)
            if head.rta_len < cls._ATTR or off + head.rta_len > len(data):
                break
            attrs[head.rta_type & NLA_TYPE_MASK] = bytes(data[off + cls._ATTR:off + head.rta_len])
            off += -(-head.rta_len // 4) * 4
        return attrs

    @classmethod
    def attribute(cls, kind, data):
        """One rtattr of ``kind`` holding ``data``, padded to 4 bytes."""
        head = bytes(rtattr(cls._ATTR + len(data), kind))
        return head + data + bytes(-len(data) % 4)

    @classmethod
    def _messages(cls, data):
        """(type, seq, body) of each netlink message in one datagram."""
        off = 0
        while off + cls._HDR <= len(data):
            head = nlmsghdr.from_buffer_copy(data, off)
            if head.nlmsg_len < cls._HDR or off + head.nlmsg_len > len(data):
                break
            yield head.nlmsg_type, head.nlmsg_seq, data[off + cls._HDR:off + head.nlmsg_len]
            off += -(-head.nlmsg_len // 4) * 4

    def request(self, kind, body, flags=0, what=""):
        """Send one request; return the (type, body) of its replies once the kernel
        acknowledged it, or ended the dump (NLM_F_DUMP).  OSError(errno, "<what>:
        <why>") if refused."""
        self._seq += 1
        head = nlmsghdr(self._HDR + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags,
                        self._seq, 0)
        self.sock.send(bytes(head) + body)
        replies = []
        while True:
            for reply, seq, data in self._messages(self.sock.recv(65536)):
                if seq != self._seq:
                    continue
                if reply not in (NLMSG_ERROR, NLMSG_DONE):
                    replies.append((reply, data))
                    continue
                err = -struct.unpack_from("i", data)[0] if len(data) >= 4 else 0
                if err:                 # a refusal, or a dump that failed part way
                    raise OSError(err, f"{what}: {os.strerror(err)}")
                return replies

    def link(self, index=0, name=None):
        """The Link of ``index``, or of ``name``."""
        body = bytes(ifinfomsg(ifi_index=index))
        if name is not None:
            body += self.attribute(IFLA_IFNAME, name.encode() + b"\0")
        replies = self.request(RTM_GETLINK, body, what=f"RTM_GETLINK of {name or index}")
        for kind, data in replies:
            if kind == RTM_NEWLINK:
                return Link(kind, data)
        raise OSError(errno.ENODEV, f"RTM_GETLINK of {name or index}: no reply")

    def set_link(self, index, what, up=None, mtu=None, netns_fd=None, address=None):
        """RTM_NEWLINK on an existing link: IFF_UP set (``up`` True) or cleared (False),
        its MTU, its MAC ``address``, or moved into the network namespace
        ``netns_fd``."""
        info = ifinfomsg(ifi_index=index, ifi_flags=IFF_UP if up else 0,
                         ifi_change=0 if up is None else IFF_UP)
        attrs = b""
        if mtu is not None:
            attrs += self.attribute(IFLA_MTU, struct.pack("I", mtu))
        if address is not None:
            attrs += self.attribute(IFLA_ADDRESS, address)
        if netns_fd is not None:
            attrs += self.attribute(IFLA_NET_NS_FD, struct.pack("I", netns_fd))
        self.request(RTM_NEWLINK, bytes(info) + attrs, what=what)

    @classmethod
    def _address(cls, index, interface):
        """ifaddrmsg and attributes of ``interface`` (an ipaddress.IPv4Interface or
        IPv6Interface) on link ``index``."""
        family = socket.AF_INET if interface.version == 4 else socket.AF_INET6
        packed = interface.ip.packed
        return (bytes(ifaddrmsg(family, interface.network.prefixlen, 0, 0, index))
                + cls.attribute(IFA_LOCAL, packed) + cls.attribute(IFA_ADDRESS, packed))

    def add_address(self, index, interface, what):
        """RTM_NEWADDR: ``interface`` on link ``index``."""
        self.request(RTM_NEWADDR, self._address(index, interface), NLM_F_CREATE | NLM_F_EXCL,
                     what)

    def del_address(self, index, interface, what):
        """RTM_DELADDR: ``interface`` off link ``index``."""
        self.request(RTM_DELADDR, self._address(index, interface), what=what)

    def addresses(self, index):
        """The addresses of link ``index`` (ipaddress interfaces), IPv4 and IPv6."""
        import ipaddress
        found = []
        for kind, data in self.request(RTM_GETADDR, bytes(ifaddrmsg()), NLM_F_DUMP,
                                       f"RTM_GETADDR of link {index}"):
            info = ifaddrmsg.from_buffer_copy(data)
            attrs = self.attributes(data[ctypes.sizeof(ifaddrmsg):])
            packed = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))     # IPv4 local; IPv6
            if (kind == RTM_NEWADDR and info.ifa_index == index and packed
                    and info.ifa_family in (socket.AF_INET, socket.AF_INET6)):
                found.append(ipaddress.ip_interface((packed, info.ifa_prefixlen)))
        return found

    def links(self):
        """The link changes announced since the last call, oldest first (non-blocking);
        None if some were lost (ENOBUFS: the socket overflowed)."""
        changes = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return changes
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                changes = None
                continue
            if changes is not None:
                changes += [Link(kind, body) for kind, _, body in self._messages(data)
                            if kind in (RTM_NEWLINK, RTM_DELLINK)]

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()


def _put_back_sysctls(ifindex, sysctls):
    """Write ``sysctls`` ({/proc/sys/net path with "{}" for the name: value}) of
    link ``ifindex`` under the name it has now; return {/proc/sys file: value
    put back}, empty if it is gone."""
    try:
        # A rename shows the new name at once, but moves the link's /proc/sys/net
        # directories only later, in its NETDEV_CHANGENAME notifiers, all under the
        # RTNL lock.  An empty RTM_NEWLINK (no change) takes that lock too: a
        # rename under way has ended when it returns.
        with Rtnl() as rtnl:
            rtnl.set_link(ifindex, f"RTM_NEWLINK of link {ifindex}")
        name = socket.if_indextoname(ifindex)
    except OSError as e:
        if e.errno not in (errno.ENODEV, errno.ENXIO):      # RTM_NEWLINK's, ioctl's
            raise
        return {}                       # removed, or moved to another namespace
    restored = {}
    for template, value in sysctls.items():
        path = _net_sysctl(template, name)
        if _sysctl_swap(path, value) is not None:
            restored[path] = value
    return restored


STATE_DIR = "/run/vhostpath"              # what a running vhostpath changed, per link
TAP_STATE_DIR = os.path.join(STATE_DIR, "tap")     # a persistent tap's (TapFound)


def _process_id(pid):
    """``pid`` and its start time (/proc/PID/stat field 22): a running process's
    identity, which a later process reusing the pid does not share; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f"{pid}@{f.read().rpartition(')')[2].split()[19]}"
    except (OSError, IndexError):
        return None


def _state_file(name, folder=STATE_DIR):
    """The record of link ``name`` in ``folder``: STATE_DIR for a NIC, TAP_STATE_DIR
    for a persistent tap."""
    if not _ifname_valid(name):                 # never a path out of the folder
        raise VhostPathError(f"invalid interface name {name!r}")
    return os.path.join(folder, f"{name}.json")


def _write_record(path, fields):
    """Record ``fields`` (what a link was before it changes: JSON values) and who
    changes it: this process (pid and start time).  Written aside and renamed:
    whole or absent."""
    import json
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    temp = f"{path}.{os.getpid()}"
    with open(temp, "w") as f:
        json.dump(dict(fields, owner=_process_id(os.getpid())), f)
    os.rename(temp, path)


def _take_record(path, read, busy):
    """``read(record)`` of the record at ``path`` (a dict: see _write_record), once
    its writer is gone; None if there is none, or it is torn or foreign (then
    it is removed: nothing in it can be trusted).  The caller removes it once
    it has put back what it holds.  Raises VhostPathError if its writer
    still runs, saying ``busy`` and the pid."""
    import json
    try:
        with open(path) as f:
            record = json.load(f)
        owner, fields = str(record["owner"]), read(record)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError):
        os.unlink(path)
        return None
    pid = owner.partition("@")[0]
    if _process_id(pid) == owner:
        raise VhostPathError(f"{busy} (pid {pid}); stop it first")
    return fields


def restore_nic(iface):
    """Put back what a vhostpath that is no longer running changed on ``iface``, from
    its record under STATE_DIR (written before the change), and remove the
    record; the NIC is the record's ifindex, renamed or not, and a record of
    a NIC since removed is only removed.  Returns {sysctl file: value put
    back} (empty without a record).

    Raises VhostPathError if the process that wrote the record still runs.
    """
    path = _state_file(iface)
    record = _take_record(path, lambda r: (int(r["ifindex"]), dict(r["sysctls"])),
                          f"{iface} is bridged by vhostpath")
    if record is None:
        return {}
    restored = _put_back_sysctls(*record)
    os.unlink(path)
    return restored


########################################################################################
# Frames: VLAN tags put back, and frames for a Python dataplane
########################################################################################


def insert_vlan_tag(buf, hdr, hdr_len, tpid, tci):
    """Put back the VLAN tag the kernel took off a received frame: a packet socket
    sees a tagged frame untagged, its tag in tp_vlan_tci (or PACKET_AUXDATA).

    ``buf[hdr:]`` holds a ``hdr_len``-byte virtio_net_hdr and the frame, with
    VLAN_HLEN free bytes before ``hdr``.  The header and the two MAC addresses
    move 4 bytes to the front, the tag (``tpid``, ``tci``) goes after them
    (IEEE 802.1Q), and the header's frame offsets grow by 4: csum_start with
    NEEDS_CSUM, hdr_len with GSO (virtio spec 5.1.6).  Returns the new header
    offset.
    """
    front = hdr - VLAN_HLEN
    buf[front:front + hdr_len + 2 * ETH_ALEN] = buf[hdr:hdr + hdr_len + 2 * ETH_ALEN].tobytes()
    struct.pack_into("!HH", buf, front + hdr_len + 2 * ETH_ALEN, tpid, tci)
    vnet = virtio_net_hdr.from_buffer_copy(buf[front:front + VIRTIO_NET_HDR_LEN])
    if vnet.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        vnet.csum_start += VLAN_HLEN
    if vnet.gso_type != VIRTIO_NET_HDR_GSO_NONE and vnet.hdr_len:
        vnet.hdr_len += VLAN_HLEN
    buf[front:front + ctypes.sizeof(vnet)] = bytes(vnet)
    return front


def insert_vlan_tag_scattered(views, nbytes, tpid, tci):
    """insert_vlan_tag for a frame received over ``views`` (memoryviews, the socket's
    10-byte header first, ``nbytes`` in all): gathered, tagged and written back.
    Returns the new byte count, or None if the views have no room for the tag."""
    if sum(map(len, views)) < VLAN_HLEN + nbytes:
        return None
    flat = bytearray(VLAN_HLEN)
    for view in views:
        flat += view[:VLAN_HLEN + nbytes - len(flat)]
    insert_vlan_tag(memoryview(flat), VLAN_HLEN, VIRTIO_NET_HDR_LEN, tpid, tci)
    done = 0
    for view in views:
        k = min(len(view), len(flat) - done)
        view[:k] = flat[done:done + k]
        done += k
    return len(flat)


class Frame:
    """An Ethernet frame and its virtio_net_hdr (virtio spec 5.1.6), as the
    dataplane calls (``recv_frames``, ``send_frames``) carry them.

    ``data``: the frame, bytes-like, its VLAN tag (if any) in place.  ``hdr``:
    the 10-byte virtio_net_hdr; all zero (the default) for a whole frame
    with its checksums done.  A frame from the kernel with LRO or rx_cksum
    may be a GSO super-frame (``gso_type``, ``gso_size``) or carry a partial
    checksum (``needs_csum``, ``csum_start``, ``csum_offset``); the NIC's
    side or the kernel completes them when the frame is sent on unchanged.
    """

    __slots__ = ("data", "hdr")

    def __init__(self, data, hdr=bytes(VIRTIO_NET_HDR_LEN)):
        if len(hdr) != VIRTIO_NET_HDR_LEN:
            raise ValueError(f"a virtio_net_hdr is {VIRTIO_NET_HDR_LEN} bytes, not {len(hdr)}")
        self.data, self.hdr = data, hdr

    def _vnet(self):
        return virtio_net_hdr.from_buffer_copy(bytes(self.hdr))

    @property
    def gso_type(self):
        """VIRTIO_NET_HDR_GSO_* (0: not a super-frame)."""
        return self._vnet().gso_type

    @property
    def gso_size(self):
        """The segment size a super-frame is cut into."""
        return self._vnet().gso_size

    @property
    def needs_csum(self):
        """Whether the checksum at csum_start + csum_offset is still to be completed."""
        return bool(self._vnet().flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)

    @property
    def csum_start(self):
        return self._vnet().csum_start

    @property
    def csum_offset(self):
        return self._vnet().csum_offset

    @property
    def vlan(self):
        """(TPID, TCI) of the frame's outer VLAN tag, or None."""
        if len(self.data) >= 2 * ETH_ALEN + VLAN_HLEN:
            tpid, tci = struct.unpack_from("!HH", self.data, 2 * ETH_ALEN)
            if tpid in (ETH_P_8021Q, ETH_P_8021AD):
                return tpid, tci
        return None

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        return f"<Frame {len(self.data)} bytes hdr={bytes(self.hdr).hex()}>"


########################################################################################
# Devices: tap, vhost-net, packet socket
########################################################################################


class Tap(_Closing):
    """A tap device from /dev/net/tun (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, and IFF_NAPI
    where the kernel has it).

    ``name`` may be a template such as ``tap%d``: the kernel picks the first
    free name, available as ``.name``.  With ``multi_queue`` (IFF_MULTI_QUEUE)
    each Tap opened on the same name is one more queue of that device.  The
    tap disappears when the last fd (ours, and the reference vhost holds) is
    closed, unless it is persistent.  Its carrier is set through the fd; its
    MTU, state, addresses and namespace through rtnetlink, in the namespace
    it is in (``netns``).  ``persistent``: the tap was made before, to outlive
    its fds (``ip tuntap add``); see TapFound.

    IFF_NAPI (Linux 4.15, asked where TUNGETFEATURES offers it): what is
    written to the tap, by vhost-net or by us, goes through the queue's
    NAPI context and so through GRO, and a TCP stream inwards reaches the
    stack as fewer, larger packets.  DPDK's virtio-user asks for it too.
    """

    NOTIFY = (("ipv4/conf/{}/arp_notify", "1"), ("ipv6/conf/{}/ndisc_notify", "1"))

    def __init__(self, name="tap%d", multi_queue=False):
        if not _tap_name_valid(name):
            raise VhostPathError(f"invalid tap name {name!r}")
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            offered = _ioctl(self.fd, "TUNGETFEATURES", TUNGETFEATURES, struct.pack("I", 0), name)
            flags = (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if multi_queue else 0)
                     | struct.unpack("I", offered)[0] & IFF_NAPI)
            req = _ifreq(name, flags)
            _ioctl(self.fd, "TUNSETIFF", TUNSETIFF, req, name)
            self._name = req.ifr_name.decode()      # the last known: see name
            self.netns, self._rtnl = None, None     # this network namespace; see move_to
            self._index = None                      # its ifindex there, once asked
            self.persistent = bool(self.flags() & IFF_PERSIST)     # made before us
        except BaseException:
            os.close(self.fd)
            raise

    def set_vnet_hdr_sz(self, size):
        """TUNSETVNETHDRSZ: the header size the tap reads and writes (10 or 12)."""
        _ioctl(self.fd, "TUNSETVNETHDRSZ", TUNSETVNETHDRSZ, struct.pack("i", size), self.name)

    def vnet_hdr_sz(self):
        """TUNGETVNETHDRSZ."""
        out = _ioctl(self.fd, "TUNGETVNETHDRSZ", TUNGETVNETHDRSZ, struct.pack("i", 0), self.name)
        return struct.unpack("i", out)[0]

    def set_sndbuf(self, size):
        """TUNSETSNDBUF; INT_MAX lets vhost-net batch small packets as XDP buffers."""
        _ioctl(self.fd, "TUNSETSNDBUF", TUNSETSNDBUF, struct.pack("i", size), self.name)

    def set_offload(self, flags):
        """TUNSETOFFLOAD (TUN_F_*): what the kernel may hand us unsegmented or unchecksummed."""
        _ioctl(self.fd, "TUNSETOFFLOAD", TUNSETOFFLOAD, flags, self.name)

    def set_virtio_net(self, hdr_len, features, mac=None):
        """The tap side of the negotiation: header size, offloads from the feature
        bits (tap_offloads), and the MAC address unless None.  Returns
        ``features`` less what the tap refused: UDP segmentation offload
        (TUN_F_USO4/6) before Linux 6.2, which then segments UDP GSO sends
        before the tap."""
        self.set_vnet_hdr_sz(hdr_len)
        try:
            self.set_offload(tap_offloads(features))
        except OSError as e:
            uso = sum(1 << bit for bit, _ in USO_OFFLOADS)
            if e.errno != errno.EINVAL or not features & uso:
                raise
            features &= ~uso
            self.set_offload(tap_offloads(features))
        if mac is not None:
            self.set_mac(mac)
        return features

    def set_mac(self, mac):
        """SIOCSIFHWADDR through the tap fd (tun accepts it there, no socket needed)."""
        req = _ifreq(self.name)
        req.ifr_ifru.ifru_hwaddr.sa_family = ARPHRD_ETHER
        req.ifr_ifru.ifru_hwaddr.sa_data[:6] = list(mac)
        _ioctl(self.fd, "SIOCSIFHWADDR", SIOCSIFHWADDR, req, self.name)

    def set_carrier(self, on):
        """TUNSETCARRIER (Linux 5.0): the tap's carrier, as if a cable were plugged in or
        pulled.  OSError EINVAL on older kernels."""
        _ioctl(self.fd, "TUNSETCARRIER", TUNSETCARRIER, struct.pack("i", int(on)), self.name)

    def rtnl(self):
        """An Rtnl in the tap's network namespace, made on first use."""
        if self._rtnl is None:
            self._rtnl = Rtnl(self.netns)
        return self._rtnl

    def index(self):
        """The tap's ifindex in its network namespace (asked once per namespace)."""
        if self._index is None:
            self._index = self.rtnl().link(name=self.name).index
        return self._index

    def set_mtu(self, mtu):
        self.rtnl().set_link(self.index(), f"MTU {mtu} on {self.name}", mtu=mtu)

    def set_up(self):
        self.rtnl().set_link(self.index(), f"bringing {self.name} up", up=True)

    def add_address(self, interface):
        """``interface``: an ipaddress.IPv4Interface or IPv6Interface."""
        self.rtnl().add_address(self.index(), interface, f"address {interface} on {self.name}")

    def move_to(self, netns):
        """Move the tap into the named network namespace; it keeps its name, and its fds
        and vhost work as before.  A multi-queue tap's other queues must be attached
        first (TUNSETIFF finds a name in the caller's namespace), and told ``netns``."""
        fd = _netns_fd(netns)
        try:
            self.rtnl().set_link(self.index(), f"moving {self.name} to network namespace "
                                 f"{netns}", netns_fd=fd)
        finally:
            os.close(fd)
        self.rtnl().close()
        self._rtnl, self.netns, self._index = None, netns, None

    def set_notify(self):
        """Once up, the kernel tells the neighbours the tap's MAC address for each of its
        addresses (a gratuitous ARP, an unsolicited neighbour advertisement:
        arp_notify and ndisc_notify in ip-sysctl.rst), so that a peer that knew
        another MAC for them (the last run's random one) takes the new one at
        once, not when its entry expires (hours, on some routers).  In the tap's
        namespace, where it is now."""
        for template, value in self.NOTIFY:
            _in_netns(self.netns, _sysctl_swap, _net_sysctl(template, self.name), value)

    def configure(self, netns=None, addresses=(), up=False):
        """Move the tap into ``netns`` (unless None), announce its addresses once up
        (set_notify), add ``addresses`` there, and bring it up if ``up`` or any
        address was given."""
        if netns is not None:
            self.move_to(netns)
        self.set_notify()
        for interface in addresses:
            self.add_address(interface)
        if up or addresses:
            self.set_up()

    @property
    def name(self):
        """The tap's name now, asked through its fd (TUNGETIFF), so a rename (``ip
        link set tap0 name ...``) is followed; once the fd is closed, or the tap
        deleted, the last one known."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                self._name = self._get_iff().ifr_name.decode()
        return self._name

    def _get_iff(self):
        """TUNGETIFF: an ifreq holding the tap's name and IFF_* flags now."""
        req = _ifreq(self._name)
        _ioctl(self.fd, "TUNGETIFF", TUNGETIFF, req, self._name)
        return req

    def flags(self):
        """TUNGETIFF: the tap's IFF_* flags."""
        return self._get_iff().ifr_ifru.ifru_flags & 0xFFFF

    def fileno(self):
        return self.fd

    def close(self):
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self):
        return f"<Tap {self.name} fd={self.fd}>"


class TapFound:
    """A persistent tap as it was found, before this process changed it: its MAC,
    MTU, up state, arp_notify and ndisc_notify, and addresses.  ``restore()``
    puts them back, whatever changed them (the MTU following the NIC, a MAC,
    addresses, up): the addresses added since go, and those that went come
    back (an IPv6 address goes when a link goes down: keep_addr_on_down 0),
    so that a tap vhostpath did not create is left as it was.  Offloads and
    the header size are left to the tap's next user, who sets its own
    (TUNSETOFFLOAD, TUNSETVNETHDRSZ) as every user of a tap does.  Both in
    this network namespace, where the tap stays.

    ``read(name)`` finds it, before the tap is opened where the name is known:
    attaching a queue turns the carrier on, and the kernel gives an up tap an
    IPv6 link-local address then.  ``keep(name)`` records it under
    TAP_STATE_DIR until restore(), so that after a SIGKILL or a crash the
    next start on the tap, or ``vhostpath cleanup --tap``, puts it back
    (restore_tap), never what a killed instance made of it.
    """

    def __init__(self, index, address, mtu, up, addresses, sysctls):
        self.index, self.address, self.mtu, self.up = index, address, mtu, up
        self.addresses, self.sysctls = addresses, sysctls
        self._record = None                 # its record's path, once kept

    @classmethod
    def read(cls, name):
        """Tap ``name`` as it is now.  OSError ENODEV if there is no link ``name``."""
        with Rtnl() as rtnl:
            link = rtnl.link(name=name)
            addresses = rtnl.addresses(link.index)
        return cls(link.index, link.address, link.mtu, bool(link.flags & IFF_UP), addresses,
                   {template: _sysctl_read(_net_sysctl(template, name))
                    for template, _ in Tap.NOTIFY})

    @classmethod
    def from_record(cls, record, path):
        """The tap ``record`` describes (read from ``path``, which restore removes);
        ValueError, KeyError, TypeError or AttributeError if it is not one."""
        import ipaddress
        sysctls = {str(template): None if value is None else str(value)
                   for template, value in record["sysctls"].items()}
        found = cls(int(record["ifindex"]), bytes.fromhex(record["mac"]), int(record["mtu"]),
                    bool(record["up"]), [ipaddress.ip_interface(a) for a in record["addresses"]],
                    sysctls)
        found._record = path
        return found

    def keep(self, name):
        """Record this as what tap ``name``, now attached, was (restore removes it)."""
        path = _state_file(name, TAP_STATE_DIR)
        _write_record(path, {"ifindex": self.index, "mac": self.address.hex(), "mtu": self.mtu,
                             "up": self.up, "addresses": [str(a) for a in self.addresses],
                             "sysctls": self.sysctls})
        self._record = path

    def restore(self):
        """Put back what changed; nothing if the tap is gone.  Found by its index, and
        its sysctls under the name it has now: renamed meanwhile, its old name may
        be another link's.  Then its record, if kept, is removed.  Returns whether
        the tap was there."""
        with Rtnl() as rtnl:
            try:
                now = rtnl.link(self.index)
            except OSError as e:
                if e.errno != errno.ENODEV:
                    raise
                now = None
            else:
                self._put_back(rtnl, now)
        if now is not None:
            _put_back_sysctls(self.index, {template: value for template, value
                                           in self.sysctls.items() if value is not None})
        if self._record is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._record)
            self._record = None
        return now is not None

    def _put_back(self, rtnl, now):
        """restore() on ``now``, the tap's link as it is: its MAC, MTU, state and
        addresses."""
        index, name = self.index, now.name   # for the messages: it may have been renamed
        if now.address != self.address:
            rtnl.set_link(index, f"MAC address back on {name}", address=self.address)
        if now.mtu != self.mtu:
            rtnl.set_link(index, f"MTU {self.mtu} back on {name}", mtu=self.mtu)
        if now.flags & IFF_UP and not self.up:
            rtnl.set_link(index, f"{name} down again", up=False)
        for interface in set(rtnl.addresses(index)) - set(self.addresses):
            try:
                rtnl.del_address(index, interface, f"address {interface} off {name}")
            except OSError as e:    # gone with another (an IPv4 secondary, its primary)
                if e.errno != errno.EADDRNOTAVAIL:
                    raise
        for interface in set(self.addresses) - set(rtnl.addresses(index)):
            rtnl.add_address(index, interface, f"address {interface} back on {name}")


def restore_tap(name):
    """Put back persistent tap ``name`` as a vhostpath that is no longer running found
    it, from its record under TAP_STATE_DIR (TapFound.keep), and remove the
    record; the tap is the record's ifindex, renamed or not, and a record of a
    tap since removed is only removed.  Returns whether a tap was put back.

    Raises VhostPathError if the process that wrote the record still runs.
    """
    path = _state_file(name, TAP_STATE_DIR)
    found = _take_record(path, lambda record: TapFound.from_record(record, path),
                         f"{name} is attached by vhostpath")
    return found is not None and found.restore()


class VhostNet:
    """One /dev/vhost-net device: a kernel worker thread serving vring 0 (RX) and 1 (TX).

    Thin wrappers, one per request, named after the ioctls.  Only the process
    that called VHOST_SET_OWNER (done here) may issue further requests.
    """

    def __init__(self, path="/dev/vhost-net"):
        self.path = path
        self.bound = [False, False]                # per vring: a backend is set
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            _ioctl(self.fd, "VHOST_SET_OWNER", VHOST_SET_OWNER, 0, path)
            out = _ioctl(self.fd, "VHOST_GET_FEATURES", VHOST_GET_FEATURES,
                         struct.pack("Q", 0), path)
            self.offered = struct.unpack("Q", out)[0]
        except BaseException:
            os.close(self.fd)
            raise

    def set_features(self, features):
        _ioctl(self.fd, "VHOST_SET_FEATURES", VHOST_SET_FEATURES,
               struct.pack("Q", features), self.path)

    def set_mem_table(self, regions):
        array = vhost_memory_region * len(regions)

        class _table(ctypes.Structure):
            _fields_ = [("hdr", vhost_memory), ("regions", array)]
        table = _table(vhost_memory(len(regions), 0), array(*regions))
        _ioctl(self.fd, "VHOST_SET_MEM_TABLE", VHOST_SET_MEM_TABLE, table, self.path)

    def set_vring_num(self, index, num):
        _ioctl(self.fd, "VHOST_SET_VRING_NUM", VHOST_SET_VRING_NUM,
               vhost_vring_state(index, num), self.path)

    def set_vring_base(self, index, base):
        _ioctl(self.fd, "VHOST_SET_VRING_BASE", VHOST_SET_VRING_BASE,
               vhost_vring_state(index, base), self.path)

    def set_vring_addr(self, index, vq):
        addr = vhost_vring_addr(index=index, flags=0, desc_user_addr=vq.desc_addr,
                                used_user_addr=vq.used_addr, avail_user_addr=vq.avail_addr)
        _ioctl(self.fd, "VHOST_SET_VRING_ADDR", VHOST_SET_VRING_ADDR, addr, self.path)

    def set_vring_kick(self, index, fd):
        _ioctl(self.fd, "VHOST_SET_VRING_KICK", VHOST_SET_VRING_KICK,
               vhost_vring_file(index, fd), self.path)

    def set_vring_call(self, index, fd):
        _ioctl(self.fd, "VHOST_SET_VRING_CALL", VHOST_SET_VRING_CALL,
               vhost_vring_file(index, fd), self.path)

    def set_vring_busyloop_timeout(self, index, usec):
        """VHOST_SET_VRING_BUSYLOOP_TIMEOUT: the worker spins this long for new buffers
        and socket data before it sleeps (0: never)."""
        _ioctl(self.fd, "VHOST_SET_VRING_BUSYLOOP_TIMEOUT", VHOST_SET_VRING_BUSYLOOP_TIMEOUT,
               vhost_vring_state(index, usec), self.path)

    def vring_busyloop_timeout(self, index):
        """VHOST_GET_VRING_BUSYLOOP_TIMEOUT, in microseconds."""
        out = _ioctl(self.fd, "VHOST_GET_VRING_BUSYLOOP_TIMEOUT", VHOST_GET_VRING_BUSYLOOP_TIMEOUT,
                     bytes(vhost_vring_state(index, 0)), self.path)
        return vhost_vring_state.from_buffer_copy(out).num

    def set_vring(self, index, vq, callfd):
        """A vring's set-up in vhost's order: size, base, addresses, call, kick."""
        self.set_vring_num(index, vq.num)
        self.set_vring_base(index, 0)
        self.set_vring_addr(index, vq)
        self.set_vring_call(index, callfd)
        self.set_vring_kick(index, vq.kickfd)

    def set_backend(self, index, fd):
        """VHOST_NET_SET_BACKEND: a tap or AF_PACKET SOCK_RAW fd, or -1 to unbind."""
        _ioctl(self.fd, "VHOST_NET_SET_BACKEND", VHOST_NET_SET_BACKEND,
               vhost_vring_file(index, fd), self.path)
        self.bound[index] = fd >= 0

    def fileno(self):
        return self.fd

    def close(self):
        """Unbind the backends, then close: the worker thread exits."""
        if self.fd >= 0:
            for index in (VHOST_NET_VQ_RX, VHOST_NET_VQ_TX):
                if self.bound[index]:
                    with contextlib.suppress(OSError):
                        self.set_backend(index, VHOST_FILE_UNBIND)
            os.close(self.fd)
            self.fd = -1

    def __repr__(self):
        return f"<VhostNet {self.path} fd={self.fd}>"


def _reported_tag(status, tpid, tci):
    """(TPID, TCI) of a tag the kernel reports beside a frame (ring slot or
    PACKET_AUXDATA): tp_vlan_tpid where it sets TP_STATUS_VLAN_TPID_VALID, else 802.1Q's."""
    return (tpid if status & TP_STATUS_VLAN_TPID_VALID else ETH_P_8021Q), tci


# A classic BPF program that drops what this host sends (skb->pkt_type
# PACKET_OUTGOING) and accepts the rest whole: PACKET_IGNORE_OUTGOING's work on
# kernels without it (before Linux 4.20).
DROP_OUTGOING = [
    (BPF_LD | BPF_W | BPF_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_PKTTYPE) & 0xFFFFFFFF),
    (BPF_JMP | BPF_JEQ | BPF_K, 0, 1, PACKET_OUTGOING),     # outgoing: on to the drop
    (BPF_RET | BPF_K, 0, 0, 0),
    (BPF_RET | BPF_K, 0, 0, 0xFFFFFFFF),
]


def attach_filter(sock, program):
    """SO_ATTACH_FILTER: the classic BPF ``program`` ((code, jt, jf, k) tuples) decides
    which frames reach ``sock``; the kernel copies it."""
    insns = (sock_filter * len(program))(*(sock_filter(*insn) for insn in program))
    prog = sock_fprog(len(program), insns)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(prog))


class PacketSocket(_Closing):
    """An AF_PACKET/SOCK_RAW socket on a NIC: every frame in, every frame out.

    PACKET_VNET_HDR puts a 10-byte virtio_net_hdr in front of each frame, so
    GSO super-frames and partial checksums (veth does both by default) cross
    intact; ``set_hdr_len(12)`` makes it the 12-byte virtio_net_hdr_mrg_rxbuf
    (``hdr_len``) where the kernel takes that (Linux 6.4).  Promiscuous, all
    protocols, own transmissions not looped back (PACKET_IGNORE_OUTGOING, Linux
    4.20; before it, a DROP_OUTGOING filter).
    A frame's VLAN tag, which the kernel takes off before a packet socket
    sees it, comes in its PACKET_AUXDATA control message (``auxdata_vlan``).
    Sockets given the same ``fanout_group`` (a 16-bit id) share the NIC's
    traffic by flow (PACKET_FANOUT_HASH), one socket per queue pair.
    ``program``, a classic BPF program ((code, jt, jf, k) tuples, see
    load_filter), selects the frames received: the rest never leave the
    kernel's softirq (SO_ATTACH_FILTER).
    """

    # CMSG_SPACE(sizeof(struct tpacket_auxdata)): room for the PACKET_AUXDATA message.
    AUXDATA_SPACE = ctypes.sizeof(cmsghdr) + -(-ctypes.sizeof(tpacket_auxdata) // 8) * 8
    # cmsg_level, cmsg_type, then tpacket_auxdata: tp_status .. tp_vlan_tpid.
    _AUXDATA = struct.Struct("=ii" + "IIIHHHH")

    def __init__(self, iface, fanout_group=None, program=None):
        self.iface = iface
        try:
            self.ifindex = socket.if_nametoindex(iface)
        except OSError:
            raise VhostPathError(f"no such network interface: {iface}") from None
        # Protocol 0 until bound: an ETH_P_ALL socket would see every interface's traffic.
        self.sock = socket.socket(AF_PACKET, socket.SOCK_RAW, 0)
        self.hdr_len = VIRTIO_NET_HDR_LEN       # the header before each frame
        try:
            self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            ignore_outgoing = self._ignore_outgoing(program)
            self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            with contextlib.suppress(OSError):   # SO_RCVBUFFORCE needs CAP_NET_ADMIN
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
            self.sock.bind((iface, ETH_P_ALL))
            mreq = packet_mreq(mr_ifindex=self.ifindex, mr_type=PACKET_MR_PROMISC)
            self.sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, bytes(mreq))
            if fanout_group is not None:
                # One group spreads flows over its sockets by a symmetric flow hash; the
                # group's own hook, not the socket's, must ignore outgoing frames.
                flags = PACKET_FANOUT_HASH | ignore_outgoing
                self.sock.setsockopt(SOL_PACKET, PACKET_FANOUT, fanout_group | flags << 16)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    def _ignore_outgoing(self, program):
        """Keep this host's own transmissions out and attach ``program`` (if any);
        returns the fanout flag that does the same for a fanout group (0 where
        the filter does it for the socket)."""
        try:
            self.sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        except OSError as e:
            if e.errno != errno.ENOPROTOOPT:
                raise
            # Linux < 4.20: no option, no flag.  DROP_OUTGOING's test, then on into
            # ``program``, whose jumps are relative and loads its own.
            attach_filter(self.sock, DROP_OUTGOING[:3] + list(program) if program
                          else DROP_OUTGOING)
            return 0
        if program:
            attach_filter(self.sock, program)
        return PACKET_FANOUT_FLAG_IGNORE_OUTGOING

    def set_hdr_len(self, size):
        """PACKET_VNET_HDR_SZ: 10, or 12 (num_buffers after the header, 0 on receive,
        skipped on send); only before a ring is set.  OSError ENOPROTOOPT before
        Linux 6.4."""
        self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR_SZ, size)
        self.hdr_len = size

    @classmethod
    def auxdata_vlan(cls, control):
        """(TPID, TCI) of the VLAN tag the kernel took off a received frame, from the
        frame's control messages ``control`` (PACKET_AUXDATA first), else None."""
        if len(control) < cls._AUXDATA.size + cmsghdr.cmsg_level.offset:
            return None
        level, kind, status, _, _, _, _, tci, tpid = cls._AUXDATA.unpack_from(
            control, cmsghdr.cmsg_level.offset)
        if (level, kind) != (SOL_PACKET, PACKET_AUXDATA) or not status & TP_STATUS_VLAN_VALID:
            return None
        return _reported_tag(status, tpid, tci)

    def send(self, frame):
        """Send one frame, its virtio_net_hdr first, without blocking.
        BlockingIOError if the socket's send buffer is full."""
        self.sock.send(frame)

    # -- for a Python dataplane: whole frames, copied -----------------------------------

    def recv_frames(self, max_frames=32):
        """Up to ``max_frames`` frames the NIC received, without blocking: a list of
        Frame, [] when none is queued.  The socket (``fileno()``) polls readable
        while one is; read until [] before waiting again.  A VLAN tag the
        kernel took off is put back (insert_vlan_tag).  Not with a receive
        ring on the socket (VhostBridge's)."""
        h, frames = self.hdr_len, []
        buf = memoryview(bytearray(VLAN_HLEN + h + MAX_FRAME))
        while len(frames) < max_frames:
            try:
                n, control, flags, _ = self.sock.recvmsg_into([buf[VLAN_HLEN:]],
                                                              self.AUXDATA_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            if flags & MSG_TRUNC or n < h + ETH_HLEN:
                continue                    # over 64 KB, or a runt: not a frame to pass on
            at, tag = VLAN_HLEN, self.auxdata_vlan(control)
            if tag:
                at = insert_vlan_tag(buf, at, h, *tag)
                n += VLAN_HLEN
            frames.append(Frame(bytes(buf[at + h:at + n]), bytes(buf[at:at + VIRTIO_NET_HDR_LEN])))
        return frames

    def send_frames(self, frames):
        """Send Frames (or bytes-like whole frames) out of the NIC without blocking;
        return how many left.  Stops at a full socket buffer (wait for POLLOUT);
        a frame the kernel refuses (too long, the NIC down) is dropped and
        counted among those.  OSError EBADF once closed, as a socket."""
        pad = bytes(self.hdr_len - VIRTIO_NET_HDR_LEN)
        for k, frame in enumerate(frames):
            frame = frame if isinstance(frame, Frame) else Frame(frame)
            try:
                self.sock.sendmsg([frame.hdr, pad, frame.data])
            except BlockingIOError:
                return k
            except OSError as e:
                if e.errno == errno.EBADF:      # closed: not this frame's fault
                    raise
        return len(frames)

    def recv_into(self, buf):
        """Receive one frame (its virtio_net_hdr first) into ``buf`` without blocking:
        (bytes, MSG_TRUNC set).  BlockingIOError if none is queued."""
        nbytes, _, flags, _ = self.sock.recvmsg_into([buf])
        return nbytes, bool(flags & MSG_TRUNC)

    def error(self):
        """The socket's pending error (SO_ERROR), cleared by reading: ENETDOWN once the
        NIC went down or away.  0 if none."""
        return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)

    def present(self):
        """Whether the NIC is still here under its name (not removed, renamed or moved
        to another network namespace)."""
        try:
            return socket.if_nametoindex(self.iface) == self.ifindex
        except OSError:
            return False

    def mtu(self):
        """The NIC's MTU (from sysfs)."""
        with open(f"/sys/class/net/{self.iface}/mtu") as f:
            return int(f.read())

    def mac(self):
        """The NIC's MAC address (bytes, from sysfs)."""
        with open(f"/sys/class/net/{self.iface}/address") as f:
            return bytes.fromhex(f.read().strip().replace(":", ""))

    def drops(self):
        """Frames the kernel dropped for want of socket buffer or ring slot since the
        last call."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, ctypes.sizeof(tpacket_stats))
        return tpacket_stats.from_buffer_copy(raw).tp_drops

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()

    def __repr__(self):
        return f"<PacketSocket {self.iface} fd={self.sock.fileno()}>"


def _tpacket_align(size):
    return -(-size // TPACKET_ALIGNMENT) * TPACKET_ALIGNMENT


# tp_status low byte -> 1 if TP_STATUS_USER / _VLAN_VALID / _VLAN_TPID_VALID is set, else 0
_USER_BIT = bytes(b & TP_STATUS_USER for b in range(256))
_VLAN_BIT = bytes(1 if b & TP_STATUS_VLAN_VALID else 0 for b in range(256))
_TPID_BIT = bytes(1 if b & TP_STATUS_VLAN_TPID_VALID else 0 for b in range(256))
_NO_OFFSETS = bytes([0, VIRTIO_NET_HDR_F_DATA_VALID])   # virtio_net_hdr flags retag accepts
_TPACKET2_HEAD = struct.Struct("=IIIH")    # tpacket2_hdr: tp_status, tp_len, tp_snaplen, tp_mac


class PacketRxRing:
    """A TPACKET_V2 receive ring (PACKET_RX_RING) on a PacketSocket, mapped here.

    In the softirq that receives a frame, the kernel copies it into the next
    ring frame, behind a tpacket2_hdr and room for the socket's ``hdr_len``-byte
    virtio-net header, whose first 10 bytes it writes right before the frame
    (see front_headers), then sets tp_status to TP_STATUS_USER.  Clearing
    tp_status hands a frame back.  The kernel fills frames strictly in ring
    order and drops (PACKET_STATISTICS) while its next frame is not back.  A
    frame too big for its slot is truncated there and, with
    PACKET_COPY_THRESH, queued whole on the socket (TP_STATUS_COPY), where
    recv() finds these in ring order.  Documentation/networking/packet_mmap.rst.

    ``frame_nr`` slots (even) of ``slot_size(max_frame, nic.hdr_len)``: 2 KB, or
    whole pages when ``max_frame`` does not fit in 2 KB.  Each frame starts at
    ``mac_offset``.  ``close()`` unmaps and frees the ring, leaving the socket
    as it was.
    """

    SLOT = 2048
    READY_WINDOW = 16                     # ready(): the first frames looked at past one

    @staticmethod
    def mac_offset_for(hdr_len):
        """Where a frame starts in its slot behind a ``hdr_len``-byte header: tpacket_rcv()
        takes netoff = TPACKET_ALIGN(hdrlen + max(16, maclen)) + the header, and
        macoff = netoff - maclen, an Ethernet frame's maclen being ETH_HLEN."""
        return _tpacket_align(TPACKET2_HDRLEN + 16) + hdr_len - ETH_HLEN

    @classmethod
    def slot_size(cls, max_frame, hdr_len):
        """The slot that holds a ``max_frame``-byte frame: 2 KB, or whole pages."""
        need = cls.mac_offset_for(hdr_len) + max_frame
        return cls.SLOT if need <= cls.SLOT else _page_round(need)

    def __init__(self, nic, frame_nr, max_frame):
        self.frame_size = self.slot_size(max_frame, nic.hdr_len)
        self.mac_offset = self.mac_offset_for(nic.hdr_len)
        self._pad = nic.hdr_len - VIRTIO_NET_HDR_LEN     # see front_headers
        self.frame_nr = frame_nr
        block_size = max(self.frame_size, mmap.PAGESIZE)
        req = tpacket_req(block_size, frame_nr * self.frame_size // block_size,
                          self.frame_size, frame_nr)
        self.sock = nic.sock
        try:
            self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            self.sock.setsockopt(SOL_PACKET, PACKET_COPY_THRESH, 1)
            self.sock.setsockopt(SOL_PACKET, PACKET_RX_RING, bytes(req))
            self.mm = mmap.mmap(self.sock.fileno(), frame_nr * self.frame_size)
        except OSError as e:
            self._free()
            raise VhostPathError(f"{nic.iface}: cannot map a packet receive ring "
                                 f"(PACKET_RX_RING, {frame_nr} x {self.frame_size} bytes): "
                                 f"{e.strerror}") from None
        self._anchor = ctypes.c_char.from_buffer(self.mm)
        self.addr = ctypes.addressof(self._anchor)
        self.view = memoryview(self.mm)
        self._u32 = self.view.cast("I")
        self._u16 = self.view.cast("H")
        self._zeros = memoryview(array.array("I", bytes(4 * frame_nr)))
        # The low byte of tp_status holds TP_STATUS_USER.
        self._status_byte = 0 if sys.byteorder == "little" else 3

    def region(self):
        """The vhost_memory_region that maps the ring (identity, as Arena.region)."""
        return vhost_memory_region(guest_phys_addr=self.addr, memory_size=len(self.mm),
                                   userspace_addr=self.addr, flags_padding=0)

    def frame_addrs(self, offset):
        """Every frame's address plus ``offset``: a memoryview of u64 ("Q")."""
        first = self.addr + offset
        return memoryview(array.array("Q", range(first, first + len(self.mm), self.frame_size)))

    def _status_bytes(self, start, n):
        fs = self.frame_size
        return self.view[start * fs + self._status_byte:(start + n) * fs:fs].tobytes()

    def ready(self, start, limit):
        """How many frames from ``start`` on (at most ``limit``, no wrap) the kernel
        has handed over (TP_STATUS_USER)."""
        if not self.view[start * self.frame_size + self._status_byte] & TP_STATUS_USER:
            return 0                              # none yet: one byte read, not ``limit``
        # Then windows growing fourfold: the status bytes are a slot apart, so a
        # look at all ``limit`` of them touches half as many pages (512 for a
        # ping with 1024 slots idle); a ping's round trip took 9 % less in one
        # guest boot once it looked at 16.
        n, window = 1, self.READY_WINDOW
        while n < limit:
            k = min(window, limit - n)
            gap = self._status_bytes(start + n, k).translate(_USER_BIT).find(0)
            if gap >= 0:
                n += gap
                break
            n, window = n + k, 4 * window
        if not _TSO:
            _full_barrier()()                     # tp_status before the frame (smp_rmb)
        return n

    def headers(self, start, n):
        """tp_status, tp_len, tp_snaplen and tp_mac of frames start .. start+n-1."""
        q, h = self.frame_size // 4, self.frame_size // 2
        u32, end = self._u32, (start + n) * q
        return (u32[start * q:end:q].tolist(), u32[start * q + 1:end:q].tolist(),
                u32[start * q + 2:end:q].tolist(),
                self._u16[start * h + 6:(start + n) * h:h].tolist())

    def whole(self, i):
        """The length of frame ``i`` if it is the usual kind: whole (tp_snaplen ==
        tp_len, no copy queued), at mac_offset and untagged; else None.  One
        unpack: for a frame alone, cheaper than headers()."""
        status, tp_len, snaplen, mac = _TPACKET2_HEAD.unpack_from(self.view, i * self.frame_size)
        if (status & (TP_STATUS_COPY | TP_STATUS_VLAN_VALID) or snaplen != tp_len
                or mac != self.mac_offset or snaplen > self.frame_size - mac):
            return None
        return snaplen

    def vlan_tagged(self, start, n):
        """Whether one of frames start .. start+n-1 came with a VLAN tag, which the
        kernel took off (TP_STATUS_VLAN_VALID)."""
        return 1 in self._status_bytes(start, n).translate(_VLAN_BIT)

    def vlan(self, i):
        """(TPID, TCI) of the tag frame ``i`` came with: tp_vlan_tpid where the kernel
        sets it (TP_STATUS_VLAN_TPID_VALID), else 802.1Q's."""
        u16 = self.frame_size // 2 * i
        return _reported_tag(self._u32[u16 // 2],
                             self._u16[u16 + tpacket2_hdr.tp_vlan_tpid.offset // 2],
                             self._u16[u16 + tpacket2_hdr.tp_vlan_tci.offset // 2])

    def front_headers(self, start, n):
        """Headers of frames start .. start+n-1 at mac_offset as a 12-byte reader (a
        tap) wants them.  With a 12-byte header size (PACKET_VNET_HDR_SZ),
        tpacket_rcv() still writes the 10-byte virtio_net_hdr right before the
        frame, 2 unused bytes in front of it; [virtio_net_hdr][num_buffers] has
        it 2 bytes further in front.  Moved by strided copies, front first;
        num_buffers is left stale (a tap skips it on transmit).  Nothing to do
        with a 10-byte header."""
        if not self._pad:
            return
        u16, h2, pad = self._u16, self.frame_size // 2, self._pad // 2
        for off in range(self.mac_offset - VIRTIO_NET_HDR_LEN, self.mac_offset, 2):
            dst = start * h2 + (off - self._pad) // 2
            u16[dst:dst + n * h2:h2] = u16[dst + pad:dst + pad + n * h2:h2]

    def front_header(self, i, mac):
        """front_headers for frame ``i`` alone, its frame at ``mac`` in its slot."""
        if self._pad:
            at = i * self.frame_size + mac
            self.view[at - self._pad - VIRTIO_NET_HDR_LEN:at - self._pad] = \
                self.view[at - VIRTIO_NET_HDR_LEN:at].tobytes()

    def retag(self, start, n, hdr_len):
        """insert_vlan_tag on frames start .. start+n-1 at once, each at mac_offset
        behind a ``hdr_len``-byte header, with strided copies (one per 2 bytes
        moved, then the TPID and TCI columns).  Only where each frame came
        tagged with its TPID reported (TP_STATUS_VLAN_VALID, _VLAN_TPID_VALID)
        and no header has offsets to move (no flag but DATA_VALID, gso_type 0);
        returns whether it did, else nothing changed."""
        fs, hdr = self.frame_size, self.mac_offset - hdr_len
        status = self._status_bytes(start, n)
        flags = self.view[start * fs + hdr:(start + n) * fs:fs].tobytes()
        gso = self.view[start * fs + hdr + 1:(start + n) * fs:fs].tobytes()
        if (status.translate(_VLAN_BIT).count(0) or status.translate(_TPID_BIT).count(0)
                or flags.translate(None, _NO_OFFSETS) or gso.count(0) < n or hdr % 2
                or hdr - VLAN_HLEN < TPACKET2_HDRLEN):
            return False
        u16, h2 = self._u16, fs // 2

        def column(off):            # u16 ``off`` of each frame
            first = start * h2 + off // 2
            return slice(first, first + n * h2, h2)
        for off in range(hdr, hdr + hdr_len + 2 * ETH_ALEN, 2):   # to the front, in order
            u16[column(off - VLAN_HLEN)] = u16[column(off)]
        tag = hdr - VLAN_HLEN + hdr_len + 2 * ETH_ALEN
        tpid = array.array("H", u16[column(tpacket2_hdr.tp_vlan_tpid.offset)])
        tci = array.array("H", u16[column(tpacket2_hdr.tp_vlan_tci.offset)])
        if sys.byteorder == "little":               # to network order
            tpid.byteswap()
            tci.byteswap()
        u16[column(tag)] = tpid
        u16[column(tag + 2)] = tci
        return True

    def release(self, start, n):
        """Hand ``n`` frames from ``start`` on (in ring order) back to the kernel.

        Only frames vhost is done with: the tp_status stores come after the
        used->idx load that showed it, an order x86-64 keeps (loads are not
        reordered with later stores) and used_pending() fences elsewhere."""
        q, first = self.frame_size // 4, min(n, self.frame_nr - start)
        self._u32[start * q:(start + first) * q:q] = self._zeros[:first]
        if n > first:                             # round the end of the ring
            self._u32[0:(n - first) * q:q] = self._zeros[:n - first]

    def _free(self):
        with contextlib.suppress(OSError):
            self.sock.setsockopt(SOL_PACKET, PACKET_RX_RING, bytes(tpacket_req()))
            self.sock.setsockopt(SOL_PACKET, PACKET_COPY_THRESH, 0)
            self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V1)

    def close(self):
        """Unmap and free the ring; only once vhost no longer reads it."""
        if self.mm is not None:
            for view in (self._u32, self._u16, self.view):
                view.release()
            del self._anchor
            self.mm.close()
            self.mm = None
            self._free()

    def __repr__(self):
        return f"<PacketRxRing {self.frame_nr} x {self.frame_size} bytes at {self.addr:#x}>"


class QuietNic:
    """The NIC's own stack kept quiet while bridging; ``restore()`` puts back what was
    there.

    The NIC stays a kernel netdev and sees every frame the tap's stack sees
    (broadcasts, multicasts; unicasts too where the tap has the NIC's MAC).
    Unsilenced, it would answer ARP for the tap's addresses, so the outside
    would learn the NIC's MAC and bypass the path, take packets for the
    tap's addresses itself (a second copy), and configure IPv6 from router
    advertisements.  So, per ip-sysctl.rst: ``arp_ignore`` 8 ("do not reply
    for all local addresses"), ``rp_filter`` 1 (strict reverse path: the
    route back to what arrives on the NIC is through the tap, so its stack
    drops it) and ``disable_ipv6`` 1.  The old values are recorded under
    STATE_DIR before they change, so that after a SIGKILL or a crash the
    next start, or ``vhostpath cleanup``, puts them back (restore_nic),
    never the values a killed instance set; a running owner is refused.
    """

    SETTINGS = (("ipv4/conf/{}/arp_ignore", "8"), ("ipv4/conf/{}/rp_filter", "1"),
                ("ipv6/conf/{}/disable_ipv6", "1"))

    def __init__(self, iface):
        restore_nic(iface)
        self.record = _state_file(iface)
        self.ifindex = socket.if_nametoindex(iface)     # its name may change meanwhile
        self.old = {}
        for template, _ in self.SETTINGS:
            value = _sysctl_read(_net_sysctl(template, iface))
            if value is not None:                       # no IPv6, say: nothing to do
                self.old[template] = value
        if not self.old:
            return
        _write_record(self.record, {"ifindex": self.ifindex, "sysctls": self.old})
        try:
            for template, value in self.SETTINGS:
                _sysctl_swap(_net_sysctl(template, iface), value)
        except BaseException:
            self.restore()
            raise

    def restore(self):
        """Put the old values back on the NIC, under the name it has now."""
        if self.old:
            _put_back_sysctls(self.ifindex, self.old)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.record)
            self.old = {}


########################################################################################
# vhost-net bring-up: the order written once
########################################################################################


class VhostDevices:
    """The vhost-net bring-up, in the order vhost-net requires, written once for
    every port and forwarder; its teardown, the mirror, is ``stack``'s.

    Made after the tap and the arena, which must outlive the devices (the
    kernel holds addresses into the arena) and so are closed after them:

    1. ``count`` devices are opened (VHOST_SET_OWNER) and agree on what all
       of them offer of ``wanted`` (``features``); EVENT_IDX only where the
       full barrier exists (see _Barrier).
    2. The caller makes its rings of ``num`` entries in ``arena`` with ``vring`` (they
       need the agreed EVENT_IDX; each gets its kick eventfd) and fills the
       rings the device writes: plain memory, read by vhost only once a
       backend is set and the ring kicked.
    3. ``start``: per device VHOST_SET_FEATURES and the memory table, per
       vring its size, base, addresses, call and kick; the tap's half of the
       negotiation (header size, offloads, MAC, sndbuf); then each vring's
       backend (VHOST_NET_SET_BACKEND) and a first kick of every ring, since
       vhost may already wait for one (DPDK kicks at port start too).

    Closing ``stack`` unbinds the backends and closes the devices (their
    worker threads exit) before the rings, eventfds, tap and arena go.
    """

    def __init__(self, stack, path, count, wanted, arena, num):
        self._stack, self.arena, self.num = stack, arena, num
        self.devices = []
        for _ in range(count):
            self.devices.append(VhostNet(path))
            stack.callback(self.devices[-1].close)
        self.offered = ~0
        for device in self.devices:
            self.offered &= device.offered
        if not _full_barrier().available:
            wanted &= ~(1 << VIRTIO_RING_F_EVENT_IDX)
        self.features = self.offered & wanted
        self._vrings = []                    # (device, vring index, vq, call fd, backend fd)

    def eventfd(self):
        """A non-blocking eventfd, closed with the stack."""
        fd = _eventfd()
        self._stack.callback(os.close, fd)
        return fd

    def vring(self, device, index, backend, callfd, ring, bufs, buf_size, device_writes):
        """Vring ``index`` of device number ``device``, moving frames to or from the fd
        ``backend`` and signalling ``callfd``: a split virtqueue at ``ring`` in the
        arena, over buffers of ``buf_size`` bytes from ``bufs`` (SplitVirtqueue)."""
        vq = SplitVirtqueue(self.arena, ring, bufs, self.num, buf_size, device_writes,
                            self.eventfd(), bool(self.features & 1 << VIRTIO_RING_F_EVENT_IDX))
        self._stack.callback(vq.close)
        self._vrings.append((self.devices[device], index, vq, callfd, backend))
        return vq

    def start(self, tables, tap, hdr_len, features, mac, busyloop=0):
        """Step 3: ``tables`` holds each device's memory regions; ``tap`` takes
        ``hdr_len``, the offloads of ``features`` and ``mac``; every vring's
        worker busy-polls ``busyloop`` microseconds.  Returns the features the
        tap took (Tap.set_virtio_net)."""
        for device, regions in zip(self.devices, tables):
            device.set_features(self.features)
            device.set_mem_table(regions)
        for device, index, vq, callfd, _ in self._vrings:
            device.set_vring(index, vq, callfd)
            if busyloop:
                device.set_vring_busyloop_timeout(index, busyloop)
        # The tap produces and consumes the virtio-net header (vhost-net is not
        # asked for VHOST_NET_F_VIRTIO_NET_HDR), so its header size must match ours.
        features = tap.set_virtio_net(hdr_len, features, mac)
        tap.set_sndbuf(INT_MAX)
        for device, index, _, _, backend in self._vrings:
            device.set_backend(index, backend)
        for _, _, vq, _, _ in self._vrings:
            vq.kick_prepare()
            vq.notify()
        return features

    def set_backend(self, vq, bound):
        """Bind ring ``vq`` to its backend again, or unbind it (VHOST_NET_SET_BACKEND).
        Unbinding returns once the worker has put every frame it took on the used
        ring, and the frames it had taken ahead (vhost_net_buf) are back at the
        head of the backend's queue, in order (those the queue has no room
        for any more are freed: ptr_ring_unconsume): vhost_net_set_backend
        flushes the device."""
        for device, index, ring, _, backend in self._vrings:
            if ring is vq:
                device.set_backend(index, backend if bound else VHOST_FILE_UNBIND)

    def describe(self, features):
        """The -v lines of the negotiation: what vhost-net offered, what was agreed
        (``features``: vhost-net's and the tap's), the barrier."""
        barrier = "mfence/dmb" if _full_barrier().available else "unavailable: kick always"
        return [f"vhost-net offered {self.offered:#x} ({feature_names(self.offered)})",
                f"negotiated {features:#x} ({feature_names(features)}); vhost-net got "
                f"{self.features:#x}, the rest is the tap's",
                f"full memory barrier for the kick decision: {barrier}"]


def describe_tap(tap, hdr_len, features):
    """The -v line of the tap's half of the negotiation."""
    offloads, flags = tap_offloads(features), tap.flags()
    # The device's flags (TUNGETIFF): an existing tap made without IFF_NAPI, or any
    # tap before Linux 4.15, shows none.
    napi = "NAPI, GRO on what is written to it" if flags & IFF_NAPI else "made without NAPI"
    return (f"virtio-net header {hdr_len} bytes; tap flags {flags:#x} ({napi}); tap offloads "
            f"{offloads:#x} ({tap_offload_names(offloads)})")


########################################################################################
# Configuration: one validated object from the command line or library arguments
########################################################################################


class ConfigError(VhostPathError):
    """A configuration value out of range, or a refused combination.  ``option`` is
    the keyword argument (``queue_size``) the message is about."""

    def __init__(self, option, why):
        super().__init__(f"{option}: {why}")
        self.option, self.why = option, why


def _parse_mac(text):
    """bytes of a unicast MAC written xx:xx:xx:xx:xx:xx or given as 6 bytes; None and
    "nic" pass through."""
    if text is None or text == "nic":
        return text
    if isinstance(text, (bytes, bytearray)) and len(text) == 6:
        mac = bytes(text)
    elif isinstance(text, str):
        parts = text.split(":")
        if len(parts) != 6 or not all(len(p) == 2 for p in parts):
            raise ConfigError("mac", f"invalid MAC address {text!r} (want xx:xx:xx:xx:xx:xx)")
        try:
            mac = bytes(int(p, 16) for p in parts)
        except ValueError:
            raise ConfigError("mac", f"invalid MAC address {text!r}") from None
    else:
        raise ConfigError("mac", f"{text!r} is not a MAC address (6 bytes or "
                                 "xx:xx:xx:xx:xx:xx)")
    if mac[0] & 1 or mac == bytes(6):
        raise ConfigError("mac", f"MAC address {text!r} is not a unicast address")
    return mac


def check_filter(program):
    """``program`` as a list of (code, jt, jf, k) tuples, once the kernel's own
    checker took it (attached to a throwaway AF_UNIX socket: no privilege, no
    device).  ConfigError ("filter") otherwise."""
    try:
        program = [tuple(insn) for insn in program]
        if not 1 <= len(program) <= BPF_MAXINSNS:
            raise ValueError(f"{len(program)} instructions, not 1 to {BPF_MAXINSNS}")
        for n, insn in enumerate(program):
            if len(insn) != 4 or not all(isinstance(v, int) for v in insn) or not (
                    0 <= insn[0] <= 0xFFFF and 0 <= insn[1] <= 0xFF and 0 <= insn[2] <= 0xFF
                    and 0 <= insn[3] <= 0xFFFFFFFF):
                raise ValueError(f"instruction {n} {insn!r} is not (code u16, jt u8, jf u8, "
                                 "k u32)")
    except (TypeError, ValueError) as e:
        raise ConfigError("filter", f"not a classic BPF program: {e}") from None
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            attach_filter(probe, program)
        except OSError as e:
            raise ConfigError("filter", f"the kernel refuses the program ({e.strerror}): "
                                        "a jump out of it, no return at its end, or an "
                                        "unknown instruction") from None
    return program


def load_filter(path):
    """The classic BPF program in file ``path``, as ``tcpdump -ddd EXPR`` prints it
    (the instruction count, then "code jt jf k" per line, decimal), checked by
    check_filter.  ConfigError ("filter") names the file and the line."""
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("filter", f"{path}: {getattr(e, 'strerror', None) or e}") from None
    lines = [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines or len(lines[0][1]) != 1 or not lines[0][1][0].isdigit():
        raise ConfigError("filter", f"{path}: line 1 is not an instruction count: expected "
                                    "what 'tcpdump -ddd EXPR' prints")
    if int(lines[0][1][0]) != len(lines) - 1:
        raise ConfigError("filter", f"{path}: says {lines[0][1][0]} instructions but has "
                                    f"{len(lines) - 1}")
    program = []
    for n, fields in lines[1:]:
        if len(fields) != 4 or not all(field.isdigit() for field in fields):
            raise ConfigError("filter", f"{path}: line {n}: expected 'code jt jf k' "
                                        f"(4 decimal numbers), not {' '.join(fields)!r}")
        program.append(tuple(int(field) for field in fields))
    try:
        return check_filter(program)
    except ConfigError as e:
        raise ConfigError("filter", f"{path}: {e.why}") from None


def _parse_addresses(texts):
    """ipaddress interfaces of addresses written with their prefix length (1.1.1.1/24,
    2001:db8::1/64), one or a sequence; interfaces pass through."""
    import ipaddress
    kinds = (str, ipaddress.IPv4Interface, ipaddress.IPv6Interface)
    try:
        texts = (texts,) if isinstance(texts, kinds) else tuple(texts)
    except TypeError:
        raise ConfigError("address", f"{texts!r} is neither an address nor a sequence of "
                                     "them") from None
    found = []
    for text in texts:
        if not isinstance(text, kinds):
            raise ConfigError("address", f"{text!r} is not an address with a prefix length")
        if isinstance(text, str):
            if "/" not in text:
                raise ConfigError("address", f"{text!r} has no prefix length (want, for "
                                             "example, 192.0.2.1/24 or 2001:db8::1/64)")
            try:
                text = ipaddress.ip_interface(text)
            except ValueError:
                raise ConfigError("address", f"{text!r} is not an IPv4 or IPv6 address "
                                             "with a prefix length") from None
        found.append(text)
    return tuple(found)


def _whole(value):
    """Whether ``value`` is a whole number (an int, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


class Config:
    """One validated configuration of a path to the kernel, taken by every port,
    forwarder and QueuePairs; the command line makes one from its options
    (each option is the keyword of the same name).  Pure checks only: making
    one touches nothing on the host.

    Args:
        tap_io: how frames cross between the rings and the tap: ``"vhost-net"``
            (the kernel's vhost worker thread) or ``"read-write"`` (this
            process, where /dev/vhost-net is missing).
        nic_io: how frames cross between the NIC and the rings: ``"vhost-net"``
            (the packet socket's receive ring in, a second vhost-net device
            out: Python moves descriptors only) or ``"socket"``
            (recvmmsg/sendmmsg in this process, which sees every frame).
            None: vhost-net with tap_io vhost-net, else socket.
        path: the vhost-net device node (DPDK's ``path``).
        queue_size: entries per virtqueue, a power of two from 64 to 32768.
        tap: tap name, or a template the kernel completes (``tap%d``).
        mac: the tap's MAC address (bytes or ``xx:xx:xx:xx:xx:xx``), ``"nic"``
            for the NIC's (forwarders only), or None for the kernel's random one.
        netns: the network namespace (a name ``ip netns`` knows) the tap is moved
            into once created; None: this one.
        address: addresses the tap is given once created, with their prefix
            lengths (``"192.0.2.1/24"``, ``"2001:db8::1/64"``); they bring it up.
        up: bring the tap up once created.
        busy_poll: microseconds this process keeps passing over its rings after
            a pass that moved frames, before it sleeps in poll() again, while
            traffic is sparse (under BUSY_POLL_MAX_FRAMES frames and
            BUSY_POLL_MAX_BYTES bytes a second; bulk traffic keeps it awake
            anyway); 0 (off) to 1000000.
        vhost_busy_poll: microseconds every vring's vhost worker spins for new
            buffers and socket data before it sleeps
            (VHOST_SET_VRING_BUSYLOOP_TIMEOUT); 0 (off) to 1000000; tap I/O
            vhost-net only.  Apart from busy_poll: a worker spins in the kernel
            with preemption off until its window ends or the scheduler wants
            the CPU, which on a small host the rest of the path needs.
        rx_cksum: VIRTIO_NET_F_GUEST_CSUM: the kernel may hand over partial
            checksums.
        lro: VIRTIO_NET_F_GUEST_TSO4/6: the kernel may hand over 64 KB TCP
            segments (needs rx_cksum).
        queues: queue pairs (QueuePairs), 1 to MAX_TAP_QUEUES.
        filter: a classic BPF program ((code, jt, jf, k) tuples; load_filter
            reads one from ``tcpdump -ddd`` output) on the NIC's packet sockets
            made by QueuePairs or the command line: only the frames it accepts
            reach the kernel through the tap; None: every frame.

    Raises:
        ConfigError: a value out of range or a refused combination, naming
        the keyword.
    """

    OPTIONS = ("tap_io", "nic_io", "path", "queue_size", "tap", "mac", "netns", "address",
               "up", "rx_cksum", "lro", "queues", "busy_poll", "vhost_busy_poll", "filter")
    TAP_IO = ("vhost-net", "read-write")
    NIC_IO = ("vhost-net", "socket")

    def __init__(self, tap_io="vhost-net", nic_io=None, path="/dev/vhost-net",
                 queue_size=256, tap="tap%d", mac=None, netns=None, address=(), up=False,
                 rx_cksum=False, lro=False, queues=1, busy_poll=0, vhost_busy_poll=0,
                 filter=None):
        if tap_io not in self.TAP_IO:
            raise ConfigError("tap_io", f"{tap_io!r} is not one of {', '.join(self.TAP_IO)}")
        if nic_io is None:
            nic_io = "vhost-net" if tap_io == "vhost-net" else "socket"
        if nic_io not in self.NIC_IO:
            raise ConfigError("nic_io", f"{nic_io!r} is not one of {', '.join(self.NIC_IO)}")
        if nic_io == "vhost-net" and tap_io != "vhost-net":
            raise ConfigError("nic_io", f"vhost-net needs tap I/O vhost-net, not {tap_io}")
        if not isinstance(path, str):
            raise ConfigError("path", f"must be a device node's path, not {path!r}")
        if not (_whole(queue_size) and MIN_QUEUE_SIZE <= queue_size <= VIRTQUEUE_MAX_SIZE
                and not queue_size & (queue_size - 1)):
            raise ConfigError("queue_size", f"must be a power of two from {MIN_QUEUE_SIZE} "
                                             f"to {VIRTQUEUE_MAX_SIZE} (a 64 KB packet takes "
                                             f"{MAX_RX_BUFS} merged RX buffers), "
                                             f"not {queue_size!r}")
        if not isinstance(tap, str) or not _tap_name_valid(tap):
            raise ConfigError("tap", f"{tap!r} is neither an interface name nor a template "
                                     "with one %d (tap%d)")
        for keyword, value in (("up", up), ("rx_cksum", rx_cksum), ("lro", lro)):
            if not isinstance(value, bool):
                raise ConfigError(keyword, f"must be True or False, not {value!r}")
        if lro and not rx_cksum:
            raise ConfigError("lro", "needs rx checksum offload (the kernel refuses TSO "
                                     "without it)")
        if not (_whole(queues) and 1 <= queues <= MAX_TAP_QUEUES):
            raise ConfigError("queues", f"must be from 1 to {MAX_TAP_QUEUES} (the tap's "
                                        f"limit), not {queues!r}")
        self.tap_io, self.nic_io, self.path, self.queue_size = tap_io, nic_io, path, queue_size
        for keyword, value in (("busy_poll", busy_poll), ("vhost_busy_poll", vhost_busy_poll)):
            if not (_whole(value) and 0 <= value <= 1000000):
                raise ConfigError(keyword, f"must be from 0 (off) to 1000000 microseconds, "
                                           f"not {value!r}")
        if vhost_busy_poll and tap_io != "vhost-net":
            raise ConfigError("vhost_busy_poll", f"needs tap I/O vhost-net, not {tap_io}")
        self.busy_poll, self.vhost_busy_poll = busy_poll, vhost_busy_poll
        if netns is not None and not (isinstance(netns, str) and netns
                                      and "/" not in netns and netns not in (".", "..")):
            raise ConfigError("netns", f"{netns!r} is not a network namespace name")
        self.tap, self.mac, self.queues = tap, _parse_mac(mac), queues
        self.netns, self.address, self.up = netns, _parse_addresses(address), up
        self.rx_cksum, self.lro = rx_cksum, lro
        self.offloads = offload_features(rx_cksum, lro)
        self.filter = None if filter is None else check_filter(filter)

    def options(self):
        """{keyword: value} of every option: ``Config(**c.options())`` is ``c`` again."""
        return {k: getattr(self, k) for k in self.OPTIONS}

    def configure_tap(self, tap):
        """What this configuration asks of a new tap once its MAC is set: moved into
        ``netns``, given ``address``, brought ``up``."""
        tap.configure(self.netns, self.address, self.up)

    def tap_mac(self, nic=None):
        """The MAC address for the tap: ``mac``, or the NIC's (a PacketSocket) for "nic"."""
        if self.mac != "nic":
            return self.mac
        if nic is None:
            raise ConfigError("mac", "'nic' takes the NIC's address: a port alone has no NIC")
        return nic.mac()

    def __repr__(self):
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in self.options().items()) + ")"


def _config(config, options):
    """``config``, or a Config made of keyword ``options`` (not both)."""
    if config is None:
        return Config(**options)
    if options:
        raise TypeError(f"options given besides a Config: {', '.join(options)}")
    return config


def _port_config(config, tap, options):
    """(_config, the opened Tap or None) for a port: a name given as its ``tap``
    argument is the Config keyword of that name (``TapPort(tap="tap5")``)."""
    if isinstance(tap, str):
        options, tap = dict(options, tap=tap), None
    return _config(config, options), tap


def _open_tap(config, push, tap=None, multi_queue=False):
    """``tap`` (an opened Tap), or a new Tap of ``config.tap``; closed by ``push``'s
    ExitStack.  A persistent tap found under that name is put back as found
    (TapFound) before it is closed, and not moved to another namespace,
    where it would stay."""
    if tap is not None:
        push(tap.close)
        return tap
    found = None
    if "%" not in config.tap:
        restore_tap(config.tap)                 # as a killed vhostpath found it
        try:
            found = TapFound.read(config.tap)
        except OSError as e:
            if e.errno != errno.ENODEV:         # none yet: the kernel makes it
                raise
    tap = Tap(config.tap, multi_queue)
    push(tap.close)
    if tap.persistent:
        found = found or TapFound.read(tap.name)
        found.keep(tap.name)
        push(found.restore)
        if config.netns is not None:
            raise VhostPathError(f"{tap.name} is a persistent tap (it existed before): it "
                                 f"stays in its network namespace, not {config.netns}; "
                                 "a tap vhostpath creates is moved there")
    return tap


########################################################################################
# Ports: frames into and out of the kernel through a tap
########################################################################################


class PortStats(ctypes.Structure):
    """Per-port counters, as in testpmd's forward statistics.

    A ctypes structure, so that worker processes can keep theirs in shared
    memory (``from_buffer``) where the parent reads them.  ``busy_passes``
    counts a forwarder's passes that found work while busy-polling (its
    NIC port's); ``tx_direct`` the frames of ``tx_packets`` a VhostBridge
    wrote to the port itself instead of through a vhost device
    (DIRECT_BATCH); ``rx_direct`` the frames of ``rx_packets`` it read from
    the tap itself, and ``rx_binds`` how often it bound the tap's RX vring to
    its vhost worker again (TAP_BIND_HOLD).  ``hook_*`` count a Bridge hook's
    verdicts other than PASS on the frames the port received.  ``rx_oversize`` /
    ``tx_oversize`` count frames longer than the port's MTU allows (GSO
    super-frames carried whole); they are reported for a port whose ``mtu``
    is known.
    """

    FIELDS = ("rx_packets", "rx_bytes", "rx_dropped", "rx_oversize",
              "tx_packets", "tx_bytes", "tx_dropped", "tx_oversize", "tx_direct",
              "busy_passes", "rx_direct", "rx_binds", "hook_bounced", "hook_dropped", "hook_kept")
    LINK_UNKNOWN, LINK_DOWN, LINK_UP = 0, 1, 2
    # ``link``: the NIC's state now (LINK_*); ``link_changes``: how often it went
    # down or up since the start.  The same for every queue pair, so not summed.
    # The name is in the structure too: a worker's tap renamed reaches the parent.
    _fields_ = [(f, ctypes.c_uint64) for f in FIELDS + ("link", "link_changes")] + [
        ("_name", ctypes.c_char * IFNAMSIZ)]

    def __init__(self, name="?", mtu=None):
        super().__init__()
        self.name, self.mtu = name, mtu

    @property
    def name(self):
        """The port's name: an interface name, shorter than IFNAMSIZ."""
        return self._name.decode()

    @name.setter
    def name(self, name):
        self._name = name.encode()

    def add(self, other):
        """Add ``other``'s counters to these (totals over queues)."""
        for f in self.FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.link = self.link or other.link
        self.link_changes = max(self.link_changes, other.link_changes)

    def link_state(self):
        """"up", "down", or None where no link is followed."""
        return {self.LINK_UP: "up", self.LINK_DOWN: "down"}.get(self.link)

    def report(self, port_id):
        """testpmd's forward statistics block for this port."""
        bar = "-" * 22
        lines = [f"  {bar} Forward statistics for port {port_id} ({self.name}) {bar}"]
        for d in ("rx", "tx"):
            D = d.upper()
            line = (f"  {D}-packets: {getattr(self, d + '_packets'):<14d} "
                    f"{D}-dropped: {getattr(self, d + '_dropped'):<14d} "
                    f"{D}-bytes: {getattr(self, d + '_bytes')}")
            if self.mtu is not None:
                line += f"  {D}-over-MTU: {getattr(self, d + '_oversize')}"
            lines.append(line)
        if self.link_state():
            lines.append(f"  Link: {self.link_state()}, {self.link_changes} changes")
        if self.tx_direct:
            lines.append(f"  TX-direct: {self.tx_direct} (of TX-packets, written by this "
                         "process: no vhost worker woken)")
        if self.busy_passes:
            lines.append(f"  Busy-poll passes that found work: {self.busy_passes}")
        if self.rx_direct or self.rx_binds:
            lines.append(f"  RX-direct: {self.rx_direct} (of RX-packets, read by this process: "
                         f"no vhost worker woken)  RX-binds: {self.rx_binds} (the vhost worker "
                         "given the RX ring again)")
        if self.hook_bounced or self.hook_dropped or self.hook_kept:
            lines.append(f"  Hook: {self.hook_bounced} bounced, {self.hook_dropped} dropped, "
                         f"{self.hook_kept} kept")
        return "\n".join(lines)

    def summary(self):
        """One compact line: rx and tx packets, bytes, drops (and the link's state)."""
        line = (f"{self.name}: rx {self.rx_packets} pkts {self.rx_bytes} B drop "
                f"{self.rx_dropped}, tx {self.tx_packets} pkts {self.tx_bytes} B drop "
                f"{self.tx_dropped}")
        if self.link_state():
            line += f", link {self.link_state()} ({self.link_changes} changes)"
        return line


class Port(_Closing):
    """A virtio-net port on a tap: what the Bridge needs of the kernel side.

    Zero-copy primitives: ``tx_reserve`` (slots; ``tx_iov`` packs a slot's
    iovecs for recvmmsg, ``tx_views`` gives memoryviews) / ``tx_commit`` or
    ``tx_cancel`` / ``tx_flush``, and ``rx_packet`` (views holding a packet,
    the virtio-net header first) or ``rx_segments`` (addresses for sendmmsg)
    / ``rx_release`` or ``rx_unget`` / ``rx_flush``.  ``call_fds()`` are
    the (RX, TX) fds to poll (TX None where there is none), ``ack_calls()``
    resets them.

    For a Python dataplane, on top of them, whole frames copied:
    ``recv_frames`` / ``send_frames`` (Frame objects, header facts included)
    and ``rx_burst`` / ``tx_burst`` (bytes); ``fileno()`` for ``selectors``
    and ``asyncio``.  Subclasses set ``config``, ``tap``, ``hdr_len``,
    ``features`` and ``stats``, and ``closed`` once closed: then these raise
    ValueError, as a closed file's methods do.
    """

    closed = False

    @property
    def name(self):
        """The tap's name."""
        return self.tap.name

    def _require_open(self):
        if self.closed:
            raise ValueError(f"{self.name}: the port is closed")

    def close(self):
        """Undo the bring-up, newest first (the subclass's ``_stack``): for a
        VirtioUserPort the backends unbound, vhost closed (its worker exits),
        eventfds, the tap (put back as found if persistent), then the arena."""
        try:
            self._stack.close()
        finally:
            self.closed = True

    def fileno(self):
        """The fd that polls readable while the kernel has sent frames (the RX call
        eventfd, or the tap): for ``selectors`` and ``asyncio``.  Edge-like
        for an eventfd: once readable, read with recv_frames / rx_burst until
        they return [] (they reset it first), and only then wait again."""
        self._require_open()
        return self.call_fds()[0]

    def tx_fileno(self):
        """The fd that polls readable once the kernel has taken frames sent before, so
        a ring that was full has room again (see send_frames); None where
        sending never runs out of room."""
        self._require_open()
        return self.call_fds()[1]

    def send_frames(self, frames):
        """Copy a sequence of Frames (or bytes-like whole frames) into the kernel,
        each with its header, without blocking; return how many were taken.
        Stops at the first with no room on the ring: keep the rest, wait for
        tx_fileno() and send them again.  A frame over 64 KB, or one the tap
        refuses (TapPort, the tap down), is dropped and counted (tx_dropped)."""
        self._require_open()
        for k, frame in enumerate(frames):
            frame = frame if isinstance(frame, Frame) else Frame(frame)
            if len(frame.data) > MAX_FRAME:
                self.stats.tx_dropped += 1
                continue
            if not self.tx_room():          # reset before the last look: room made after
                self.ack_calls([self.tx_fileno()])      # it signals tx_fileno() again
            slots = self.tx_reserve(1)
            if not slots:
                self.tx_flush()
                return k
            # The slot's views: the 10-byte header, then the frame's room (tx_iov).
            data, off = memoryview(b"".join([frame.hdr, frame.data])), 0
            for v in self.tx_views(slots[0]):
                n = min(len(v), len(data) - off)
                v[:n] = data[off:off + n]
                off += n
                if off == len(data):
                    break
            self.tx_commit(slots[0], self.hdr_len + len(frame.data))
        self.tx_flush()
        return len(frames)

    def recv_frames(self, max_frames=32):
        """Copy up to ``max_frames`` frames the kernel sent: a list of Frame, [] when
        none is left (the RX call is reset first: see fileno)."""
        self._require_open()
        self.ack_calls([self.call_fds()[0]])
        frames, h = [], self.hdr_len
        while len(frames) < max_frames:
            views = self.rx_packet()
            if views is None:
                break
            frames.append(Frame(b"".join([views[0][h:], *views[1:]]),
                                bytes(views[0][:VIRTIO_NET_HDR_LEN])))
            self.rx_release()
        self.rx_flush()
        return frames

    def tx_burst(self, frames, hdr=b""):
        """send_frames for bytes-like frames (a sequence) that all take ``hdr``, a
        virtio_net_hdr (10 bytes; shorter is zero-padded; default all zero: no
        offload)."""
        head = bytes(hdr).ljust(VIRTIO_NET_HDR_LEN, b"\0")[:VIRTIO_NET_HDR_LEN]
        return self.send_frames([Frame(frame, head) for frame in frames])

    def rx_burst(self, max_packets=32):
        """recv_frames, as bytes (the frames only)."""
        return [frame.data for frame in self.recv_frames(max_packets)]


class VirtioUserPort(Port):
    """A virtio-net driver whose device is the kernel's vhost-net, backed by a tap.

    One queue pair: vring 0 receives what the kernel sends on the tap, vring 1
    carries what we send into the kernel.  Usable on its own (``rx_burst`` /
    ``tx_burst`` copy frames in and out) or zero-copy from the Bridge
    (``tx_reserve`` / ``tx_commit``, ``rx_segments`` / ``rx_release``).

    Args:
        config: a Config, or its keyword arguments instead (``queue_size=1024``):
            path, tap, queue_size, mac, rx_cksum and lro apply.
        tap: an opened Tap (a queue of a multi-queue tap), which the port then
            owns; default: a new tap named as ``config.tap`` says (a name here
            is that Config keyword).
        stats: the PortStats to count in (shared memory), default new ones.

    Raises:
        VhostPathError, OSError: set-up failed; everything created is released.
    """

    VHOST_FEATURES = 1 << VIRTIO_NET_F_MRG_RXBUF   # what we ask of vhost-net itself

    def __init__(self, config=None, tap=None, stats=None, **options):
        self.config, tap = _port_config(config, tap, options)
        self.stats = stats or PortStats()
        self._stack = contextlib.ExitStack()
        try:
            self._start(tap)
        except BaseException:
            self._stack.close()
            raise

    def _start(self, tap):
        """The bring-up (VhostDevices), with this port's buffer layout."""
        push, config, num = self._stack.callback, self.config, self.config.queue_size
        self.tap = _open_tap(config, push, tap)
        self.stats.name = self.tap.name
        ring_size = _page_round(vring_layout(num)[3])
        rx_bufs, tx_bufs = 2 * ring_size, 2 * ring_size + num * RX_BUF_SIZE
        spills = tx_bufs + num * TX_BUF_SIZE
        self.arena = Arena(spills + SPILLS * SPILL_SIZE)
        push(self.arena.close)
        self.vhost = VhostDevices(self._stack, config.path, 1, self.VHOST_FEATURES,
                                  self.arena, num)
        self.features = self.vhost.features | config.offloads
        self.hdr_len = vnet_hdr_len(self.features)
        self.callfds = [self.vhost.eventfd(), self.vhost.eventfd()]
        tap_fd = self.tap.fileno()
        self.rxq = self.vhost.vring(0, VHOST_NET_VQ_RX, tap_fd, self.callfds[VHOST_NET_VQ_RX],
                                    ring=0, bufs=rx_bufs, buf_size=RX_BUF_SIZE,
                                    device_writes=True)
        self.txq = self.vhost.vring(0, VHOST_NET_VQ_TX, tap_fd, self.callfds[VHOST_NET_VQ_TX],
                                    ring=ring_size, bufs=tx_bufs, buf_size=TX_BUF_SIZE,
                                    device_writes=False)
        for desc_id in self.rxq.take_free(num):         # every RX buffer to the device
            self.rxq.add_buf(desc_id, RX_BUF_SIZE)
        self._layout_tx(tx_bufs, spills)
        self.features = self.vhost.start([[self.arena.region()]], self.tap, self.hdr_len,
                                         self.features, config.tap_mac(),
                                         config.vhost_busy_poll)
        if tap is None:
            config.configure_tap(self.tap)
        self._rx_taken = []                # [(desc id, length)] per packet taken, in order
        self._rx_pending = 0               # used entries those packets cover
        self._mrg_rxbuf = self.hdr_len == VIRTIO_NET_HDR_MRG_RXBUF_LEN
        self._rx_base = self.arena.addr + rx_bufs

    def _layout_tx(self, tx_bufs, spills):
        """Views and iovecs of the TX buffers and spill areas, made once."""
        push, num, view = self._stack.callback, self.config.queue_size, self.arena.view
        # Per TX buffer: the packet socket's 10-byte header, and what follows the
        # hdr_len-byte header: a 10-byte header scatters into a 12-byte layout.
        self._tx_split = [(b[:VIRTIO_NET_HDR_LEN], b[self.hdr_len:]) for b in self.txq.bufs]
        push(lambda: [v.release() for pair in self._tx_split for v in pair])
        base = self.arena.addr + tx_bufs
        self._iov_head = [struct.pack("QQQQ", base + d * TX_BUF_SIZE, VIRTIO_NET_HDR_LEN,
                                      base + d * TX_BUF_SIZE + self.hdr_len,
                                      TX_BUF_SIZE - self.hdr_len)
                          for d in range(num)]
        self._spill_addr = [self.arena.addr + spills + i * SPILL_SIZE for i in range(SPILLS)]
        self._iov_spill = [struct.pack("QQ", a, SPILL_SIZE) for a in self._spill_addr]
        self._spill_views = [view[spills + i * SPILL_SIZE:spills + (i + 1) * SPILL_SIZE]
                             for i in range(SPILLS)]
        push(lambda: [v.release() for v in self._spill_views])
        self._spill_free = list(range(SPILLS))
        self._spill_of = [0] * num          # per chain head: the spill area it uses

    def __repr__(self):
        return (f"<VirtioUserPort {self.tap.name} via {self.config.path} "
                f"queue_size={self.config.queue_size}>")

    def describe(self):
        """The -v lines: the negotiation with vhost-net and the tap."""
        return [*self.vhost.describe(self.features),
                describe_tap(self.tap, self.hdr_len, self.features)]

    def call_fds(self):
        """(RX, TX) fds to poll: the call eventfds, readable when the device used buffers."""
        return tuple(self.callfds)

    def ack_calls(self, fds=None):
        """Reset call eventfds (those in ``fds``, default all) before draining the used
        rings: a buffer used after this signals again, so no wakeup is lost."""
        for fd in self.callfds if fds is None else fds:
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 8)

    # -- into the kernel (TX virtqueue) --------------------------------------------------

    def tx_reclaim(self):
        """Take back the TX chains (and spill areas) the device has consumed."""
        txq = self.txq
        for _ in range(txq.used_pending()):
            head, _ = txq.get_buf()
            ids = txq.chains[head]
            if len(ids) == 2:                   # head buffer + spill area
                txq.set_addr(ids[1], txq.buf_addr(ids[1]))
                self._spill_free.append(self._spill_of[head])
            txq.put_free(ids)

    def tx_reserve(self, count):
        """Up to ``count`` slots for frames to come: (descriptor, spill area) pairs.

        Fill them (``tx_iov`` for recvmmsg, ``tx_views`` to copy), then give
        each to ``tx_commit`` or ``tx_cancel``.  A spare descriptor per slot
        stays free for the spill area's place in the chain.
        """
        txq, spills = self.txq, self._spill_free
        if txq.num_free() < 2 * count or len(spills) < count:
            self.tx_reclaim()
        count = min(count, txq.num_free() // 2, len(spills))
        slots = list(zip(txq.take_free(count), spills[len(spills) - count:]))
        del spills[len(spills) - count:]
        return slots

    def tx_iov(self, slot):
        """Packed iovecs of a slot: the packet socket's 10-byte header, the rest of the
        buffer after the hdr_len-byte header, then the spill area."""
        return self._iov_head[slot[0]] + self._iov_spill[slot[1]]

    def tx_views(self, slot):
        """A slot as memoryviews, in the order of tx_iov."""
        return [*self._tx_split[slot[0]], self._spill_views[slot[1]]]

    def tx_commit(self, slot, length):
        """Queue ``slot`` holding ``length`` bytes (hdr_len included): one descriptor,
        or two when the frame ran into the spill area.  Returns True (queued)."""
        head, spill = slot
        txq = self.txq
        if length <= TX_BUF_SIZE:
            self._spill_free.append(spill)
            txq.add_chain((head,), length)
        else:
            extra, = txq.take_free(1)
            txq.set_addr(extra, self._spill_addr[spill])
            self._spill_of[head] = spill
            txq.add_chain((head, extra), length)
        self.stats.tx_packets += 1
        self.stats.tx_bytes += length - self.hdr_len
        return True

    def tx_cancel(self, slots):
        """Return reserved slots unused."""
        for head, spill in slots:
            self.txq.put_free((head,))
            self._spill_free.append(spill)

    def tx_flush(self):
        """Publish queued TX buffers; kick if vhost asks for it."""
        self.txq.kick()

    def tx_room(self):
        """Whether tx_reserve can succeed now, or a used TX chain will make it succeed."""
        return ((self.txq.num_free() >= 2 and bool(self._spill_free))
                or self.txq.used_pending() > 0)

    # -- from the kernel (RX virtqueue) --------------------------------------------------

    def _rx_take(self):
        """Peek the next unclaimed packet on the used ring: [(desc id, length)], or None.

        With MRG_RXBUF the packet spans num_buffers used entries, checked
        against what the device published.
        """
        rxq, h = self.rxq, self.hdr_len
        taken = self._rx_pending
        pending = rxq.used_pending() - taken
        if pending <= 0:
            return None
        desc_id, length = rxq.peek_used(taken)
        if length < h:
            rxq.mark_broken(f"used len {length} is shorter than the {h}-byte header")
        entries = [(desc_id, length)]
        if self._mrg_rxbuf:
            at = virtio_net_hdr_mrg_rxbuf.num_buffers.offset
            nbufs = int.from_bytes(rxq.bufs[desc_id][at:at + 2], sys.byteorder)
            if not 1 <= nbufs <= pending:
                rxq.mark_broken(f"num_buffers {nbufs} but {pending} used entries published")
            entries += [rxq.peek_used(taken + k) for k in range(1, nbufs)]
        self._rx_pending += len(entries)
        self._rx_taken.append(entries)
        return entries

    def rx_packet(self):
        """The next packet the kernel sent, as buffer views, or None.

        The first view starts with the virtio-net header (hdr_len bytes);
        with MRG_RXBUF a large packet continues in further views (num_buffers
        of them).  The entries stay on the used ring until rx_release()
        or rx_unget() (take them again later).
        """
        entries = self._rx_take()
        return None if entries is None else [self.rxq.bufs[d][:n] for d, n in entries]

    def rx_segments(self):
        """Like rx_packet, as (address, length) pairs: for sendmmsg."""
        entries = self._rx_take()
        base = self._rx_base
        return None if entries is None else [(base + d * RX_BUF_SIZE, n) for d, n in entries]

    def rx_release(self, count=None):
        """Give the buffers of the first ``count`` packets taken (default all) back."""
        rxq = self.rxq
        done = self._rx_taken[:count]
        del self._rx_taken[:count]
        nbytes = entries_done = 0
        for entries in done:
            for desc_id, length in entries:
                rxq.consume_used(desc_id)
                rxq.add_buf(desc_id, RX_BUF_SIZE)
                nbytes += length
            entries_done += len(entries)
        self._rx_pending -= entries_done
        self.stats.rx_packets += len(done)
        self.stats.rx_bytes += nbytes - self.hdr_len * len(done)

    def rx_unget(self):
        """Put back the packets taken and not released: rx_packet returns them again."""
        self._rx_taken.clear()
        self._rx_pending = 0

    def rx_flush(self):
        """Publish refilled RX buffers; kick if vhost asks for it."""
        self.rxq.kick()


class TapPort(Port):
    """The fallback where /dev/vhost-net is missing: this process moves the packets.

    Same tap, same virtio-net header semantics (so the same offloads), but
    frames cross with ``read()`` / ``write()`` on the tap fd instead of through
    a vhost worker's virtqueues: one system call per packet in Python, and no
    kernel thread of its own.  Holds one packet from the kernel at a time.

    Args: as VirtioUserPort (``path`` and ``queue_size`` do not apply).
    """

    def __init__(self, config=None, tap=None, stats=None, **options):
        self.config, tap = _port_config(config, tap, options)
        self.features = self.config.offloads
        self.hdr_len = VIRTIO_NET_HDR_LEN
        self._stack = contextlib.ExitStack()
        try:
            self.tap = _open_tap(self.config, self._stack.callback, tap)
            self.stats = stats or PortStats()
            self.stats.name = self.tap.name
            self.features = self.tap.set_virtio_net(self.hdr_len, self.features,
                                                    self.config.tap_mac())
            if tap is None:
                self.config.configure_tap(self.tap)
        except BaseException:
            self._stack.close()
            raise
        size = self.hdr_len + MAX_FRAME
        self._txmem = memoryview(bytearray(RECV_BATCH * size))
        self._tx_anchor = ctypes.c_char.from_buffer(self._txmem)
        addr = ctypes.addressof(self._tx_anchor)
        self._txbufs = [self._txmem[i * size:(i + 1) * size] for i in range(RECV_BATCH)]
        self._iov = [struct.pack("QQQQ", addr + i * size, self.hdr_len,
                                 addr + i * size + self.hdr_len, MAX_FRAME)
                     for i in range(RECV_BATCH)]
        self._tx_free = list(range(RECV_BATCH))
        self._rxbuf = memoryview(bytearray(self.hdr_len + MAX_FRAME))
        self._rx_anchor = ctypes.c_char.from_buffer(self._rxbuf)
        self._rx_addr = ctypes.addressof(self._rx_anchor)
        self._rx_len = 0                  # bytes of the packet held, 0 if none
        self._rx_taken = False            # handed out by rx_packet, not yet released

    def __repr__(self):
        return f"<TapPort {self.tap.name} (read-write)>"

    def describe(self):
        """The -v lines: features, header and the tap's offloads."""
        return [f"tap I/O read-write; features {self.features:#x} "
                f"({feature_names(self.features)})",
                describe_tap(self.tap, self.hdr_len, self.features)]

    def call_fds(self):
        """(RX, TX) fds to poll: the tap fd, readable when the kernel sent something;
        no TX fd, since every write() completes at once."""
        return (self.tap.fd, None)

    def ack_calls(self, fds=None):
        """Nothing to reset: the tap fd is level-triggered."""

    def tx_reserve(self, count):
        """Up to ``count`` of the RECV_BATCH frame buffers, as one-element slots."""
        count = min(count, len(self._tx_free))
        slots = [[i] for i in self._tx_free[len(self._tx_free) - count:]]
        del self._tx_free[len(self._tx_free) - count:]
        return slots

    def tx_iov(self, ids):
        """Packed iovecs of a slot: the 10-byte header, then MAX_FRAME bytes."""
        return self._iov[ids[0]]

    def tx_views(self, ids):
        buf = self._txbufs[ids[0]]
        return [buf[:self.hdr_len], buf[self.hdr_len:]]

    def tx_commit(self, ids, length):
        """write() the frame to the tap; False if the kernel refused it (tap down: EIO)."""
        self._tx_free.append(ids[0])
        try:
            os.write(self.tap.fd, self._txbufs[ids[0]][:length])
        except OSError:
            self.stats.tx_dropped += 1
            return False
        self.stats.tx_packets += 1
        self.stats.tx_bytes += length - self.hdr_len
        return True

    def tx_cancel(self, slots):
        self._tx_free += [ids[0] for ids in slots]

    def tx_flush(self):
        """Nothing to publish: every write() is already delivered."""

    def tx_room(self):
        return True

    def rx_packet(self):
        """The next packet the kernel sent, [header + frame], or None if none (or one
        is already taken and not released)."""
        if self._rx_taken:
            return None
        if not self._rx_len:
            try:
                self._rx_len = os.readv(self.tap.fd, [self._rxbuf])
            except BlockingIOError:
                return None
        self._rx_taken = True
        return [self._rxbuf[:self._rx_len]]

    def rx_segments(self):
        """Like rx_packet, as (address, length) pairs: for sendmmsg."""
        return None if self.rx_packet() is None else [(self._rx_addr, self._rx_len)]

    def rx_release(self, count=None):
        """Done with the held packet."""
        if self._rx_taken and count != 0:
            self.stats.rx_packets += 1
            self.stats.rx_bytes += self._rx_len - self.hdr_len
            self._rx_len, self._rx_taken = 0, False

    def rx_unget(self):
        """Keep the held packet: rx_packet returns it again."""
        self._rx_taken = False

    def rx_flush(self):
        """Nothing to publish."""


########################################################################################
# Forwarders: a NIC bridged to the kernel
########################################################################################


_POLL_FAULTS = select.POLLERR | select.POLLHUP | select.POLLNVAL

# A Bridge hook's verdicts on a frame: pass it on, send it back out where it came
# from, drop it, or keep it (the hook consumed it).  The directions it is told.
PASS, BOUNCE, DROP, KEEP = "pass", "bounce", "drop", "keep"
INWARD, OUTWARD = "inward", "outward"           # NIC -> kernel, kernel -> NIC


class _Forwarder(_Closing):
    """What Bridge and VhostBridge share: the NIC, the poll loop, stop() and statistics.

    Subclasses call ``_attach_nic`` and ``_open_wakeup`` (undone by
    ``_close_wakeup``), provide ``name``, ``tap`` and ``tap_stats``, and define
    ``_poll_fds()`` (fd -> poll events at start) and ``_step(ready)`` (one
    pass over what poll() reported, or over everything for None, which may
    change ``self._poller``; returns the frames moved), may define
    ``_wake_at()``, and set ``busy_poll`` and ``vhost_busy_poll`` (Config's).
    """

    def _attach_nic(self, nic, nic_stats):
        """The NIC, its counters (``nic_stats``, or new ones) and the largest frame
        it carries unsegmented: its MTU plus an Ethernet header and one VLAN tag."""
        mtu = nic.mtu()
        self.nic = nic
        self.nic_stats = nic_stats or PortStats(nic.iface, mtu)
        self._max_frame = mtu + ETH_HLEN + VLAN_HLEN
        self.carrier_follows = True          # until TUNSETCARRIER is refused (Linux < 5.0)
        self._running = self._tap_mtu = None
        self._rate = _TrafficRate(BUSY_POLL_MAX_FRAMES, BUSY_POLL_MAX_BYTES, BUSY_POLL_PERIOD)

    def describe_busy_poll(self):
        """The -v line of the busy-poll setting."""
        line = (f"busy-poll: {self.busy_poll} us after a pass that moved frames, while "
                f"traffic is {SPARSE_TRAFFIC}" if self.busy_poll
                else "busy-poll: off (poll() sleeps until a device or the NIC signals)")
        if self.vhost_busy_poll:
            line += (f"; every vring's vhost worker spins {self.vhost_busy_poll} us for new "
                     "work (VHOST_SET_VRING_BUSYLOOP_TIMEOUT)")
        return line

    def describe_following(self):
        """What of the NIC the tap follows (a -v line, and a warning where the carrier
        cannot follow)."""
        if self.carrier_follows:
            return f"{self.name} follows {self.nic.iface}: carrier and MTU ({self._tap_mtu})"
        return (f"{self.name} follows {self.nic.iface}'s MTU ({self._tap_mtu}) but not its "
                "carrier: TUNSETCARRIER needs Linux 5.0")

    def _follow_nic(self):
        """The tap takes the NIC's carrier and MTU as the kernel sees them now."""
        with Rtnl() as rtnl:
            self._follow(rtnl.link(self.nic.ifindex))

    def _follow(self, link):
        """The tap follows ``link``, the NIC's: its carrier is the NIC's running
        state (TUNSETCARRIER, so the kernel stops routing into a dead link), its
        MTU the NIC's.  Each change of running state is counted."""
        st = self.nic_stats
        if link.running != self._running:
            if self._running is not None:
                st.link_changes += 1
            self._running = link.running
            st.link = st.LINK_UP if link.running else st.LINK_DOWN
            if self.carrier_follows:
                try:
                    self.tap.set_carrier(link.running)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self.carrier_follows = False
        # A NIC's MTU may pass the tap's largest (a veth's or lo's 65535): the tap
        # then keeps its largest, and takes the NIC's larger frames all the same.
        mtu = link.mtu and min(link.mtu, TAP_MAX_MTU)
        if mtu is not None and mtu != self._tap_mtu:
            self.tap.set_mtu(mtu)
            self._tap_mtu, st.mtu = mtu, link.mtu
            self._max_frame = link.mtu + ETH_HLEN + VLAN_HLEN

    def _open_wakeup(self):
        self._stopping = False
        self._poller = None                  # run()'s, while it runs
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def _close_wakeup(self):
        """Close the wakeup pipe; a late stop() (a signal) then writes nowhere."""
        fds, (self._wake_r, self._wake_w) = (self._wake_r, self._wake_w), (-1, -1)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def stop(self):
        """Ask run() to return (safe from signal handlers and other threads)."""
        self._stopping = True
        with contextlib.suppress(OSError):      # full pipe, or closed already
            os.write(self._wake_w, b"x")

    def run(self, stats_interval=None, on_stats=None):
        """Forward until stop(); call ``on_stats(self)`` every ``stats_interval`` s.
        Meanwhile the tap follows the NIC's carrier and MTU.

        Raises VhostPathError when the NIC is removed, renamed or moved to another
        network namespace, or the tap deleted (the message says which);
        RingBrokenError when a device broke a ring; ValueError once closed.
        """
        if self._wake_r < 0:
            raise ValueError(f"{self.name}: run() after close()")
        # rtnetlink's link group tells of every link change: the NIC's carrier and
        # MTU, and its removal (a NIC that went down and is then removed sets no
        # socket error then).  Read once more after subscribing: nothing is missed.
        with Rtnl(groups=RTMGRP_LINK) as links:
            self._follow_nic()
            self._poller = select.poll()
            try:
                self._loop(links, _Ticker(stats_interval), on_stats)
            finally:
                self._poller = None

    def _loop(self, links, ticker, on_stats):
        fds = self._poll_fds()
        fds.setdefault(self.tap.fileno(), 0)        # its errors only: the tap deleted
        fds[links.fileno()] = select.POLLIN
        for fd, events in fds.items():
            self._poller.register(fd, events)
        self._poller.register(self._wake_r, select.POLLIN)
        # Looked up once: a wakeup's first steps are on a round trip's path.
        links_fd, tap_fd, nic_fd = links.fileno(), self.tap.fileno(), self.nic.fileno()
        while not self._stopping:
            ready = dict(self._poller.poll(ticker.timeout(self._wake_at())))
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 64)
            if links_fd in ready:
                self._check_links(links)
            tap_events, nic_events = ready.get(tap_fd, 0), ready.get(nic_fd, 0)
            if (tap_events | nic_events) & _POLL_FAULTS:
                self._check_faults(tap_events, nic_events, links)
            if self._step(ready) and self.busy_poll and self._sparse(time.monotonic()):
                self._busy()
            if ticker.due() and on_stats:
                on_stats(self)

    def _wake_at(self):
        """When poll() must return though nothing happens (a monotonic time), or None."""
        return None

    def _sparse(self, now):
        """Whether traffic through the NIC is sparse enough to busy-poll for."""
        st = self.nic_stats
        return self._rate.sparse(st.rx_packets + st.tx_packets, st.rx_bytes + st.tx_bytes, now)

    def _busy(self):
        """Busy-poll: pass over everything again, without poll(), until busy_poll
        microseconds go by without a pass that moved frames, or traffic is no
        longer sparse (BUSY_POLL_MAX_FRAMES, _BYTES); such passes are counted.  A
        frame that comes meanwhile is taken without a wakeup."""
        window = self.busy_poll / 1e6
        now = time.monotonic()
        deadline = now + window
        while not self._stopping and now < deadline:
            moved = self._step(None)
            now = time.monotonic()
            if moved:
                self.nic_stats.busy_passes += 1
                if not self._sparse(now):
                    return
                deadline = now + window

    def _check_links(self, links):
        """Links changed somewhere: the NIC must still be here under its name, and
        the tap follows what changed of it (everything is read again if changes
        were lost)."""
        changes = links.links()
        self._name_loss(changes)
        self._require_nic(links)
        if changes is None:
            self._follow_nic()
            return
        for link in changes:
            if link.index == self.nic.ifindex:
                self._follow(link)

    def _name_loss(self, changes):
        """Stop, saying what happened, if ``changes`` (Links) removed, renamed or moved
        the NIC."""
        for link in changes or ():
            if link.index != self.nic.ifindex:
                continue
            if link.gone:
                happened = ("moved to another network namespace" if link.moved
                            else "removed")
                raise VhostPathError(f"{self.nic.iface} was {happened}: stopping")
            if link.name != self.nic.iface:
                raise VhostPathError(f"{self.nic.iface} was renamed {link.name}: stopping")

    def _require_nic(self, links):
        """Stop if the NIC is no longer here under its name.  The kernel announces a
        removal just after the socket learns of it, so its message, which names
        what happened, is waited for a moment."""
        if self.nic.present():
            return
        deadline = time.monotonic() + 1
        while select.select([links], [], [], max(0, deadline - time.monotonic()))[0]:
            self._name_loss(links.links())
        raise VhostPathError(f"{self.nic.iface} is gone (removed, renamed or moved to "
                             "another network namespace): stopping")

    def _check_faults(self, tap_events, nic_events, links):
        """An error or hang-up poll() reported on the tap or the NIC socket (in
        ``tap_events``, ``nic_events``): the tap deleted (tun reports POLLERR on
        a detached fd), or the NIC gone, which ends the bridge; or the NIC down
        (ENETDOWN), which is read and so cleared: the kernel hooks the socket in
        again when the link comes back.  An error that is neither would wake
        poll() for ever: it ends the bridge too."""
        if tap_events & _POLL_FAULTS:
            raise self._tap_deleted()
        if nic_events & _POLL_FAULTS:
            err = self.nic.error()
            self._require_nic(links)
            if not err:
                raise VhostPathError(f"{self.nic.iface}: the packet socket reports an error "
                                     "it does not name: stopping")

    def _tap_deleted(self):
        """The error that ends the bridge when its tap is gone."""
        return VhostPathError(f"{self.name} was deleted (or its queue detached): stopping")

    def refresh_stats(self):
        """Add the packet socket's drop count (read and cleared from the kernel); the
        tap's counters take its name now (renamed meanwhile)."""
        self.nic_stats.rx_dropped += self.nic.drops()
        self.tap_stats.name = self.name

    def report(self):
        """Forward statistics of both ports, testpmd style."""
        self.refresh_stats()
        return "\n".join([self.nic_stats.report(0), self.tap_stats.report(1)])


class Bridge(_Forwarder):
    """Forwards between a NIC (packet socket) and a Port, both ways.

    ``run()`` is a poll loop on the NIC socket, the port's call fds and a
    wakeup pipe; each wakeup drains everything ready.  Frames are received
    straight into TX ring buffers and sent straight from RX ring buffers:
    Python never copies payload.  ``stop()`` may be called from a signal
    handler.  ``nic`` (a PacketSocket) and ``port`` are not owned: close them
    after ``close()``.  ``nic_stats`` may be given (shared memory);
    ``quiet_nic`` makes the NIC's own stack silent on ARP while bridging
    (QuietNic).

    ``hook(direction, frame)``, if given, sees every frame: ``direction`` is
    INWARD (from the NIC) or OUTWARD (from the kernel), ``frame`` a writable
    memoryview of the Ethernet frame (its virtio_net_hdr travels with it,
    unchanged), valid only during the call: copy what you keep.  It returns
    PASS (on its way, with the hook's changes), BOUNCE (back out where it
    came from, changed: a reply), DROP or KEEP; the last three are counted
    (``hook_*`` of the receiving port's statistics).  Anything else, or an
    exception, ends run().  Without a hook the data path is as without this.
    Outwards, a hook sends frame by frame (one system call each).
    """

    VERDICTS = (PASS, BOUNCE, DROP, KEEP)

    def __init__(self, nic, port, nic_stats=None, quiet_nic=True, hook=None):
        self.port, self.hook = port, hook
        self._judged = False             # OUTWARD: the first frame taken next was PASSed
        self.busy_poll, self.vhost_busy_poll = port.config.busy_poll, port.config.vhost_busy_poll
        self._attach_nic(nic, nic_stats)
        self._nic_blocked = False         # a send to the NIC hit a full socket buffer
        self._send = _MsgBatch(SEND_BATCH, 1 + MAX_RX_BUFS)
        self._recv = _MsgBatch(RECV_BATCH, 3, PacketSocket.AUXDATA_SPACE)
        self._open_wakeup()               # what needs undoing last, undone if it fails
        self._quiet = None
        try:
            self._quiet = QuietNic(nic.iface) if quiet_nic else None
            self._follow_nic()
        except BaseException:
            self.close()
            raise

    @property
    def name(self):
        """The tap's name."""
        return self.port.name

    @property
    def tap(self):
        """The port's tap."""
        return self.port.tap

    @property
    def tap_stats(self):
        """The port's counters."""
        return self.port.stats

    def __repr__(self):
        return f"<Bridge {self.nic.iface} <-> {self.port!r}>"

    def describe(self):
        """The -v lines: how the NIC is served, then the port's negotiation."""
        return [f"NIC side: recvmmsg/sendmmsg on the packet socket on {self.nic.iface}",
                *self.port.describe(), self.describe_following(), self.describe_busy_poll()]

    def close(self):
        """Restore the NIC's settings (QuietNic) and release the wakeup pipe (not the
        ports)."""
        if self._quiet:
            self._quiet.restore()
        self._close_wakeup()

    def nic_to_kernel(self):
        """Receive frames from the NIC into free TX buffers; return how many.

        Up to RECV_BATCH frames per recvmmsg(2), scattered straight into the
        slots the port reserved (header, first buffer, then whole buffers).
        A frame that came with a VLAN tag gets it back (insert_vlan_tag_scattered).
        Counters are summed in locals and stored once per call.
        """
        port, h, batch, max_frame = self.port, self.port.hdr_len, self._recv, self._max_frame
        fd, done, nbytes, oversize, dropped = self.nic.fileno(), 0, 0, 0, 0
        while True:
            slots = port.tx_reserve(batch.count)
            if not slots:
                break
            for j, ids in enumerate(slots):
                batch.set_iov_bytes(j, port.tx_iov(ids))
            try:
                got = batch.recvmmsg(fd, len(slots))
            except OSError as e:             # none queued, or the NIC went down (read)
                port.tx_cancel(slots)
                if e.errno in (errno.EAGAIN, errno.ENETDOWN):
                    break
                raise
            for j in range(got):
                flags, n = batch.result(j)
                tag = PacketSocket.auxdata_vlan(batch.control_data(j))
                if tag and not flags & MSG_TRUNC:         # no room for the tag: dropped
                    n = insert_vlan_tag_scattered(port.tx_views(slots[j]), n, *tag) or 0
                size = n - VIRTIO_NET_HDR_LEN
                if flags & MSG_TRUNC or size < ETH_HLEN:
                    dropped += 1
                    port.tx_cancel(slots[j:j + 1])
                    continue
                if self.hook is not None and not self._hook_inward(port.tx_views(slots[j]),
                                                                   size):
                    port.tx_cancel(slots[j:j + 1])
                    continue
                done += 1
                nbytes += size
                if size > max_frame:
                    oversize += 1
                port.tx_commit(slots[j], size + h)
            port.tx_cancel(slots[got:])
            if got < len(slots):
                break
        port.tx_flush()
        st = self.nic_stats
        st.rx_packets += done
        st.rx_bytes += nbytes
        st.rx_oversize += oversize
        st.rx_dropped += dropped
        return done

    def _judge(self, direction, views, size):
        """The hook's verdict on the ``size``-byte frame held in ``views`` (in order):
        (verdict, frame).  The hook sees the buffer where the frame is in one
        piece, else a copy, written back for PASS."""
        if size <= len(views[0]):
            frame = views[0][:size]
            verdict = self.hook(direction, frame)
        else:
            frame = memoryview(bytearray(b"".join(views)[:size]))
            verdict = self.hook(direction, frame)
            done = 0
            for view in views if verdict == PASS else ():
                k = min(len(view), size - done)
                view[:k] = frame[done:done + k]
                done += k
        if verdict not in self.VERDICTS:
            raise VhostPathError(f"the hook returned {verdict!r}, not one of "
                                 f"{', '.join(self.VERDICTS)}: stopping")
        return verdict, frame

    def _hook_inward(self, views, size):
        """Judge a frame from the NIC (``views``: the socket's 10-byte header, then
        the frame); True to pass it to the kernel, else done with here."""
        verdict, frame = self._judge(INWARD, views[1:], size)
        if verdict == PASS:
            return True
        st = self.nic_stats
        st.rx_packets += 1
        st.rx_bytes += size
        if verdict == BOUNCE:
            st.hook_bounced += 1
            try:
                self.nic.send(b"".join([views[0], frame]))
            except OSError:                  # a full socket buffer, the NIC down...
                st.tx_dropped += 1
            else:
                st.tx_packets += 1
                st.tx_bytes += size
        elif verdict == DROP:
            st.hook_dropped += 1
        else:
            st.hook_kept += 1
        return False

    def _kernel_to_nic_hooked(self):
        """kernel_to_nic with a hook: each frame judged, then sent alone."""
        port, h, st = self.port, self.port.hdr_len, self.nic_stats
        done = 0
        self._nic_blocked = False
        while True:
            views = port.rx_packet()
            if views is None:
                break
            size = sum(map(len, views)) - h
            parts = [views[0][h:], *views[1:]]
            verdict = PASS if self._judged else self._judge(OUTWARD, parts, size)[0]
            self._judged = False
            if verdict == PASS:
                try:
                    self.nic.send(b"".join([views[0][:VIRTIO_NET_HDR_LEN], *parts]))
                except BlockingIOError:      # retry on POLLOUT, not judged again
                    port.rx_unget()
                    self._judged = self._nic_blocked = True
                    break
                except OSError:              # EMSGSIZE, ENETDOWN, ...: dropped
                    st.tx_dropped += 1
                else:
                    done += 1
                    st.tx_packets += 1
                    st.tx_bytes += size
                    st.tx_oversize += size > self._max_frame
            elif verdict == BOUNCE:
                self.tap_stats.hook_bounced += 1
                bounced = Frame(b"".join(parts), bytes(views[0][:VIRTIO_NET_HDR_LEN]))
                if not port.send_frames([bounced]):     # the TX ring full: lost, counted
                    self.tap_stats.tx_dropped += 1
            elif verdict == DROP:
                self.tap_stats.hook_dropped += 1
            else:
                self.tap_stats.hook_kept += 1
            port.rx_release()
        port.rx_flush()
        return done

    def kernel_to_nic(self):
        """Send what the kernel put on the RX ring out of the NIC; return how many.

        Up to SEND_BATCH packets per sendmmsg(2), gathered straight from the
        ring buffers; the 12-byte header layout is split to the packet
        socket's 10 bytes by the iovecs.  Counters as in nic_to_kernel.
        """
        if self.hook is not None:
            return self._kernel_to_nic_hooked()
        port, h, batch, max_frame = self.port, self.port.hdr_len, self._send, self._max_frame
        fd, done, nbytes, oversize, dropped = self.nic.fileno(), 0, 0, 0, 0
        self._nic_blocked = False
        while True:
            n = 0
            while n < batch.count:
                segs = port.rx_segments()
                if segs is None:
                    break
                addr, length = segs[0]
                segs[0] = (addr + h, length - h)
                batch.set_iov(n, [(addr, VIRTIO_NET_HDR_LEN), *segs])
                n += 1
            if not n:
                break
            try:
                sent = batch.sendmmsg(fd, n)
            except BlockingIOError:          # socket buffer full: retry on POLLOUT
                port.rx_unget()
                self._nic_blocked = True
                break
            except OSError:                  # EMSGSIZE, ENETDOWN, ...: the first is dropped
                dropped += 1
                sent = 1
            else:
                for k in range(sent):
                    size = batch.result(k)[1] - VIRTIO_NET_HDR_LEN
                    nbytes += size
                    if size > max_frame:
                        oversize += 1
                done += sent
            port.rx_release(sent)
            port.rx_unget()                  # the rest go in the next round
        port.rx_flush()
        st = self.nic_stats
        st.tx_packets += done
        st.tx_bytes += nbytes
        st.tx_oversize += oversize
        st.tx_dropped += dropped
        return done

    def poll_once(self, ready=None):
        """One pass over what is ready; return the frames moved.

        ``ready`` maps the fds poll() reported to their events; None tries
        everything.  Only what fired is touched: an idle direction costs no
        system call.
        """
        port, nic_fd = self.port, self.nic.fileno()
        rx_fd, tx_fd = port.call_fds()
        if ready is None:
            ready = {rx_fd: select.POLLIN, tx_fd: select.POLLIN,
                     nic_fd: select.POLLIN | select.POLLOUT}
        port.ack_calls([fd for fd in (rx_fd, tx_fd) if fd in ready])
        nic_events, moved = ready.get(nic_fd, 0), 0
        if rx_fd in ready or nic_events & select.POLLOUT:
            moved += self.kernel_to_nic()
        if nic_events & select.POLLIN:
            moved += self.nic_to_kernel()
        return moved

    def _poll_fds(self):
        self._nic_mask = select.POLLIN
        fds = {fd: select.POLLIN for fd in self.port.call_fds() if fd is not None}
        fds[self.nic.fileno()] = self._nic_mask
        return fds

    def _step(self, ready):
        moved = self.poll_once(ready)
        # Read the NIC only while the port has TX room (else its call wakes
        # us); wait for POLLOUT while a send to the NIC is blocked.
        mask = ((select.POLLIN if self.port.tx_room() else 0)
                | (select.POLLOUT if self._nic_blocked else 0))
        if mask != self._nic_mask:
            self._poller.modify(self.nic.fileno(), mask)
            self._nic_mask = mask
        return moved


class VhostBridge(_Forwarder):
    """Forwards between a NIC and a tap through vhost-net: Python moves descriptors.

    The *tap device* is vhost-net with the tap as its backend, as in
    VirtioUserPort.  The *NIC device* is a second /dev/vhost-net whose TX
    backend is the NIC's packet socket: VHOST_NET_SET_BACKEND accepts an
    AF_PACKET SOCK_RAW fd, and its PACKET_VNET_HDR header is the same 10-byte
    virtio_net_hdr the tap uses, so GSO frames and partial checksums cross
    unchanged.  Frames from the NIC arrive in the socket's receive ring
    (PacketRxRing), copied there by the kernel in the softirq that received
    them, the way DPDK's af_packet PMD receives::

        NIC --softirq--> packet ring frame i = tap TX descriptor i --vhost--> tap
        NIC <--vhost-- NIC TX ring <-- tap RX ring <--vhost-- tap   (buffer pool)

    Inwards, ring frame i is descriptor i of the tap TX ring, pointing at the
    frame's virtio_net_hdr: a frame the kernel hands over is offered as it
    is, and given back to the kernel once the tap device has used it.
    Outwards, buffer i of one pool is descriptor i in both rings: the used
    entries (i, len) of the tap RX ring are offered on the NIC TX ring, and a
    used TX entry offers buffer i to the RX ring again.  Where the packet
    socket takes the 12-byte header (Linux 6.4, PACKET_VNET_HDR_SZ), the tap
    device merges RX buffers (MRG_RXBUF): the buffers are pages, and a packet
    spanning k of them (num_buffers k) goes on the NIC TX ring as a chain of
    those k descriptors.  Under traffic Python touches no
    payload (but for frames larger than a ring slot, received with recv) and
    per wakeup makes one poll(), one read of the call eventfd all rings share
    and the kicks vhost asks for.  No TX ring can be full: when the kernel
    falls behind, the packet ring or the tap RX ring runs out of room and
    the kernel drops (counted).

    A few frames while neither TX ring has any in flight (DIRECT_BATCH: a
    ping, an ARP, a TCP request) go without a vhost worker: written to the tap, or
    sent on the packet socket, from here (``tx_direct`` in the statistics).
    Meanwhile the tap's RX vring is unbound, and what the kernel sends is read
    from the tap here too (``rx_direct``), until a burst binds the ring to its
    worker again (TAP_BIND_HOLD; ``rx_binds``).

    ``nic`` is an open PacketSocket (not owned; its ring is removed again on
    close).  ``config`` (or its keyword arguments instead) and ``tap`` as for
    VirtioUserPort; ``tap_stats`` is its ``stats``; ``nic_stats`` and
    ``quiet_nic`` as for Bridge.  ``close()`` releases everything but the
    NIC socket.
    """

    VHOST_FEATURES = 1 << VIRTIO_RING_F_EVENT_IDX     # what we ask of both devices

    def __init__(self, nic, config=None, tap=None, nic_stats=None, tap_stats=None,
                 quiet_nic=True, **options):
        self.config = _config(config, options)
        self.queue_size = self.config.queue_size
        self.busy_poll, self.vhost_busy_poll = self.config.busy_poll, self.config.vhost_busy_poll
        self._attach_nic(nic, nic_stats)
        self.tap_stats = tap_stats or PortStats()
        self.resizes = 0                    # data paths made again for a larger MTU
        self._stack = contextlib.ExitStack()
        try:
            self._start(tap, quiet_nic)
        except BaseException:
            self._stack.close()
            raise

    def _start(self, tap, quiet_nic):
        """The tap, the data path (``_datapath``), then the tap's configuration and
        the NIC's (QuietNic, carrier and MTU)."""
        push, config = self._stack.callback, self.config
        self.tap = _open_tap(config, push, tap)
        self.tap_stats.name = self.tap.name
        self._tap_buf = bytearray(VHOST_BUF_SIZE)   # a frame read from the tap (_read_tap)
        self._tap_view = memoryview(self._tap_buf)
        self._open_wakeup()
        push(self._close_wakeup)
        # The packet socket's header, the tap's too: 12 bytes where the kernel takes
        # that (Linux 6.4), so the tap device can merge RX buffers; else 10.
        try:
            self.nic.set_hdr_len(VIRTIO_NET_HDR_MRG_RXBUF_LEN)
        except OSError as e:            # before 6.4; or a ring on the socket already,
            if e.errno not in (errno.ENOPROTOOPT, errno.EBUSY):    # refused below
                raise
        else:
            push(self.nic.set_hdr_len, VIRTIO_NET_HDR_LEN)    # given back as it was
        self.hdr_len = self.nic.hdr_len
        self.merged = self.hdr_len == VIRTIO_NET_HDR_MRG_RXBUF_LEN
        self._datapath = contextlib.ExitStack()
        push(lambda: self._datapath.close())        # the one in use (see _resize)
        self._start_datapath(config.tap_mac(self.nic))
        if tap is None:
            config.configure_tap(self.tap)
        self._quiet = QuietNic(self.nic.iface) if quiet_nic else None
        if self._quiet:
            push(self._quiet.restore)
        self._follow_nic()

    def _start_datapath(self, mac):
        """The bring-up (VhostDevices) of both devices, with this bridge's layout and
        packet ring slots for the NIC's MTU; the tap takes ``mac`` unless None."""
        push, config, num = self._datapath.callback, self.config, self.queue_size
        ring = _page_round(vring_layout(num)[3])
        out_size = MERGED_BUF_SIZE if self.merged else VHOST_BUF_SIZE
        pool_out, spills = 3 * ring, 3 * ring + num * out_size
        # The arena and the packet ring outlive both vhost fds: made before, closed after.
        self.arena = Arena(spills + SPILLS * VHOST_BUF_SIZE)
        push(self.arena.close)
        # The packet ring has room for a burst (NIC_RING_BYTES), in a whole
        # number of tap TX rings: frame f is tap TX descriptor f % num.
        slots = NIC_RING_BYTES // PacketRxRing.slot_size(self._max_frame, self.hdr_len)
        self.nic_ring = PacketRxRing(self.nic, max(num, 1 << slots.bit_length() - 1),
                                     self._max_frame)
        push(self.nic_ring.close)
        # Only EVENT_IDX (and MRG_RXBUF) is asked of vhost-net: the offload bits are
        # the tap's (TUNSETOFFLOAD), and the packet socket honours the same header.
        wanted = self.VHOST_FEATURES | (1 << VIRTIO_NET_F_MRG_RXBUF if self.merged else 0)
        self.vhost = VhostDevices(self._datapath, config.path, 2, wanted, self.arena, num)
        if self.merged and not self.vhost.features >> VIRTIO_NET_F_MRG_RXBUF & 1:
            raise VhostPathError(f"{config.path} does not offer MRG_RXBUF")
        self.features = self.vhost.features | config.offloads
        self.callfd = self.vhost.eventfd()          # one call eventfd all rings share
        tap_fd, nic_fd = self.tap.fileno(), self.nic.fileno()
        self.tap_rxq = self.vhost.vring(0, VHOST_NET_VQ_RX, tap_fd, self.callfd, ring=0,
                                        bufs=pool_out, buf_size=out_size, device_writes=True)
        # Tap TX descriptors own no buffer: each is pointed at a ring slot or a spill.
        self.tap_txq = self.vhost.vring(0, VHOST_NET_VQ_TX, tap_fd, self.callfd, ring=ring,
                                        bufs=spills, buf_size=0, device_writes=False)
        self.nic_txq = self.vhost.vring(1, VHOST_NET_VQ_TX, nic_fd, self.callfd, ring=2 * ring,
                                        bufs=pool_out, buf_size=out_size, device_writes=False)
        self.tap_rxq.add_run(0, num)                # the whole pool to the tap RX ring
        # Merged: num_buffers of each pool buffer, a u16 10 bytes into it (read by
        # _forward only then).
        self._num_buffers = self._ones = None
        if self.merged:
            self._num_buffers = self.arena.view[pool_out:pool_out + num * out_size].cast("H")[
                VIRTIO_NET_HDR_LEN // 2::out_size // 2]
            push(self._num_buffers.release)
            self._ones = memoryview(array.array("H", [1] * num))
        self._merging = None                    # (ids, lengths, num_buffers) of a packet
        # The shortest used length of a tap RX buffer: a header, but merged, a
        # buffer after a packet's first may hold any length.
        self._rx_min_len = 1 if self.merged else self.hdr_len
        self._chains = {}                       # NIC TX head -> the ids chained there
        # Where tap TX descriptors point: a frame's header in its ring slot.
        # [untagged, retagged]: see PacketRxRing.retag.
        hdr = self.nic_ring.mac_offset - self.hdr_len
        self._frame_addrs = [self.nic_ring.frame_addrs(hdr),
                             self.nic_ring.frame_addrs(hdr - VLAN_HLEN)]
        # A frame too big for its slot goes into a spill area, held until used.
        self._spill_views = [self.arena.view[spills + i * VHOST_BUF_SIZE:
                                             spills + (i + 1) * VHOST_BUF_SIZE]
                             for i in range(SPILLS)]
        for view in self._spill_views:
            push(view.release)
        self._spills = list(range(SPILLS))      # free spill areas
        self._spill_of = {}                     # tap TX descriptor -> its spill area
        self._spill_base = self.arena.addr + spills
        self._nic_head = self._nic_tail = 0     # next frame to look at; oldest not given back
        self._nic_lost = None                   # a frame whose copy came truncated: dropped
        arena = self.arena.region()
        self.features = self.vhost.start([[arena, self.nic_ring.region()], [arena]],
                                         self.tap, self.hdr_len, self.features, mac,
                                         config.vhost_busy_poll)
        self._tap_bound, self._hold_until = True, 0.0
        self._bind_tap(False)                   # idle: TAP_BIND_HOLD

    def _follow(self, link):
        super()._follow(link)
        if PacketRxRing.slot_size(self._max_frame, self.hdr_len) > self.nic_ring.frame_size:
            self._resize()

    def _resize(self):
        """The NIC's MTU outgrew the packet ring's slots (frames that do not fit
        take recv(), one system call each): the data path is made again for it.
        The tap, its addresses, the NIC's socket and the counters stay; frames
        in the rings are dropped (setting a packet ring purges its socket's
        queue too), and TCP sends them again."""
        polled = self._poller is not None
        if polled:
            self._poller.unregister(self.callfd)
        self._datapath.close()
        self._datapath = contextlib.ExitStack()
        self._start_datapath(None)
        self.resizes += 1
        if polled:
            self._poller.register(self.callfd, select.POLLIN)
            self._poller.modify(self.nic.fileno(), select.POLLIN)
            self._nic_wait = True

    @property
    def name(self):
        """The tap's name."""
        return self.tap.name

    def __repr__(self):
        return (f"<VhostBridge {self.nic.iface} <-> {self.tap.name} via {self.config.path} "
                f"queue_size={self.queue_size}>")

    def describe(self):
        """The -v lines: how the NIC is served, then the negotiation."""
        ring = self.nic_ring
        out = (f"merged {MERGED_BUF_SIZE}-byte buffers (a {self.hdr_len}-byte header: "
               "PACKET_VNET_HDR_SZ)" if self.merged else
               f"whole-frame {VHOST_BUF_SIZE}-byte buffers (a {self.hdr_len}-byte header)")
        return [f"NIC side: in through the packet socket's receive ring on {self.nic.iface} "
                f"({ring.frame_nr} x {ring.frame_size} bytes), out through a second vhost-net "
                f"device, backend the packet socket; Python moves descriptors only; "
                f"{self.queue_size} {out} towards the NIC, {SPILLS} spill areas for frames "
                "larger than a slot",
                *self.vhost.describe(self.features),
                describe_tap(self.tap, self.hdr_len, self.features),
                f"tap RX: read by this process while no frame is in flight (the vring "
                f"unbound), by the tap's vhost worker from a burst until "
                f"{TAP_BIND_HOLD * 1000:.0f} ms without one",
                self.describe_following(),
                self.describe_busy_poll()]

    def close(self):
        """Restore the NIC, unbind and close both devices, then the tap, the packet ring
        and the arena: the bring-up's mirror."""
        self._stack.close()

    def _count(self, rx_stats, tx_stats, lengths, lost=(), direct=0):
        """Count frames of ``lengths`` bytes (virtio_net_hdr included) received and
        forwarded; those of ``lost`` (some of the same lengths) as dropped instead.
        ``direct`` of them were sent from here (DIRECT_BATCH), ``lost`` among
        those: only a send from here can fail."""
        h, n = self.hdr_len, len(lengths)
        nbytes = sum(lengths) - h * n
        rx_stats.rx_packets += n
        rx_stats.rx_bytes += nbytes
        tx_stats.tx_packets += n - len(lost)
        tx_stats.tx_direct += direct - len(lost)
        tx_stats.tx_bytes += nbytes - (sum(lost) - h * len(lost))
        tx_stats.tx_dropped += len(lost)
        limit = self._max_frame + h
        if max(lengths) > limit:
            over = sum(1 for length in lengths if length > limit)
            rx_stats.rx_oversize += over
            tx_stats.tx_oversize += over

    def _forward(self, kicks):
        """Offer what the tap device received on the NIC TX ring; return how many.
        A ring that needs a kick is added to ``kicks``."""
        moved, txq = 0, self.nic_txq
        while True:
            run = self.tap_rxq.get_run(self._rx_min_len)
            if run is None:
                break
            moved += self._forward_run(*run)
        if moved and txq.kick_prepare():
            kicks.append(txq)
        return moved

    def _forward_run(self, first, count, lengths):
        """_forward for one run of the tap RX ring (get_run); returns the packets
        offered, sent from here (DIRECT_BATCH) or put on the NIC TX ring."""
        rxq, txq, h = self.tap_rxq, self.nic_txq, self.hdr_len
        # The usual run: a packet per buffer (num_buffers 1 in each, merged).
        if self.merged and not (self._merging is None and min(lengths) >= h and
                                self._num_buffers[first:first + count] == self._ones[:count]):
            return self._forward_merged(first, count, lengths)
        done, lost = (self._send_nic(first, count, lengths)
                      if count <= DIRECT_BATCH and self._rings_idle() else (0, []))
        if done:
            rxq.add_run(first, done)        # recycled now: see _recycle
        if done < count:
            txq.add_run(first + done, count - done, lengths[done:])
        self._count(self.tap_stats, self.nic_stats, lengths, lost, done)
        return count

    def _rings_idle(self):
        """Whether neither TX ring has a frame in flight (DIRECT_BATCH)."""
        return not self.tap_txq.in_flight() and not self.nic_txq.in_flight()

    def _send_nic(self, first, count, lengths):
        """Send the frames in tap RX buffers ``first``, ... (``lengths`` bytes each)
        on the packet socket from here (DIRECT_BATCH): (how many are done with,
        the lengths of those of them the socket refused).  Those after a full
        send buffer are left for the NIC device."""
        bufs, num, lost = self.tap_rxq.bufs, self.queue_size, []
        for k in range(count):
            try:
                self.nic.send(bufs[(first + k) & (num - 1)][:lengths[k]])
            except BlockingIOError:
                return k, lost
            except OSError:                 # the NIC down (ENETDOWN), a qdisc drop...
                lost.append(lengths[k])
        return count, lost

    def _forward_merged(self, first, count, lengths):
        """_forward for a run holding packets that span several buffers (or the end of
        one that began in the run before): each packet goes on the NIC TX ring
        as a chain of its buffers.  Returns the packets offered."""
        rxq, h, size, sizes = self.tap_rxq, self.hdr_len, self.tap_rxq.buf_size, []
        for desc_id, length in zip(range(first, first + count), lengths):
            if self._merging is None:
                # The device wrote num_buffers; a packet's first buffer holds its header.
                if length < h:
                    rxq.mark_broken(f"used len {length} is shorter than the {h}-byte header")
                wanted = self._num_buffers[desc_id]
                if not 1 <= wanted <= rxq.num:
                    rxq.mark_broken(f"num_buffers {wanted} in a {rxq.num}-entry ring")
                self._merging = ([], [], wanted)
            ids, lens, wanted = self._merging
            ids.append(desc_id)
            lens.append(length)
            if len(ids) < wanted:
                if length != size:          # virtio 5.1.6.4: all but the last used whole
                    rxq.mark_broken(f"merged buffer {desc_id} holds {length} of {size} bytes")
                continue
            self._merging = None
            self.nic_txq.add_chain(ids, sum(lens))
            if len(ids) > 1:
                self._chains[ids[0]] = ids
            sizes.append(sum(lens))
        if sizes:
            self._count(self.tap_stats, self.nic_stats, sizes)
        return len(sizes)

    def _recycle(self, kicks):
        """Offer the buffers the NIC TX ring has sent (each buffer of a chain) to the
        tap RX ring again."""
        while True:
            run = self.nic_txq.get_run()
            if run is None:
                break
            first, count, _ = run
            if not self._chains:
                self.tap_rxq.add_run(first, count)
                continue
            ids = []
            for head in range(first, first + count):
                chain = self._chains.pop(head, None)
                if chain is None:
                    ids.append(head)
                else:
                    self.nic_txq.unchain(chain)
                    ids += chain
            self.tap_rxq.add_bufs(ids)
        if self.tap_rxq.kick_prepare():
            kicks.append(self.tap_rxq)

    def _receive(self, kicks):
        """Offer the frames the kernel put in the packet ring on the tap TX ring; return
        how many.  The frames on the tap TX ring are the ``in_flight`` ones just
        before ``_nic_head`` (vhost uses them in order), so the rest are looked at."""
        ring, txq, moved = self.nic_ring, self.tap_txq, 0
        room = txq.num - txq.in_flight()
        while room:
            start = self._nic_head
            limit = min(room, ring.frame_nr - start)
            n = ring.ready(start, limit)
            if not n:
                break
            status, tp_len, snaplen, mac = ring.headers(start, n)
            first = start % txq.num                  # frame f is descriptor f % num
            # The usual batch: whole frames at mac_offset, all untagged, or all tagged
            # and put back at once (retag), each frame then 4 bytes further in front.
            tag, fronted = None, False
            if snaplen == tp_len and min(mac) == max(mac) == ring.mac_offset \
                    and max(snaplen) <= ring.frame_size - ring.mac_offset:
                ring.front_headers(start, n)
                fronted = True
                tag = VLAN_HLEN if ring.vlan_tagged(start, n) else 0
                if tag and not ring.retag(start, n, self.hdr_len):
                    tag = None
            lost, direct = [], 0                # refused by the tap; written from here
            if tag is not None:
                lengths = array.array("I", [length + self.hdr_len + tag for length in snaplen])
                if n <= DIRECT_BATCH and self._rings_idle():
                    lost = self._write_tap(start, n, tag, lengths)
                    direct = n
                else:
                    txq.set_addrs(first, self._frame_addrs[bool(tag)][start:start + n])
                    txq.add_run(first, n, memoryview(lengths))
                taken = n
            else:
                ids, lengths, taken = self._receive_odd(start, status, tp_len, snaplen, mac,
                                                        fronted)
                txq.add_bufs(ids, lengths)
            self._nic_head = (start + taken) % ring.frame_nr
            room -= taken
            if lengths:
                self._count(self.nic_stats, self.tap_stats, lengths, lost, direct)
                moved += len(lengths)
            if taken < limit:
                break
        if moved and txq.kick_prepare():
            kicks.append(txq)
        return moved

    def _write_usual(self, f, written, refused):
        """Write ring frame ``f`` to the tap from here (DIRECT_BATCH) if it is the usual
        kind (PacketRxRing.whole), its length added to ``written``, and to
        ``refused`` too if the tap refused it; False if it is not that kind."""
        ring = self.nic_ring
        length = ring.whole(f)
        if length is None:
            return False
        ring.front_header(f, ring.mac_offset)
        length += self.hdr_len
        written.append(length)
        refused += self._write_tap(f, 1, 0, (length,))
        self._nic_head = (f + 1) % ring.frame_nr
        return True

    def _write_tap(self, start, n, tag, lengths):
        """Write ring frames ``start``, ... (``lengths`` bytes each from their header,
        ``tag`` bytes in front of the usual place) to the tap from here
        (DIRECT_BATCH), then hand them back; return the lengths of those the tap
        refused.  Called only with no frame out, so none is handed back before
        an earlier one."""
        ring, fd, lost = self.nic_ring, self.tap.fileno(), []
        offset = ring.mac_offset - self.hdr_len - tag
        for f, length in zip(range(start, start + n), lengths):
            at = f * ring.frame_size + offset
            try:
                os.write(fd, ring.view[at:at + length])
            except OSError:                 # the tap down (EIO), a bad header (EINVAL)
                lost.append(length)
        ring.release(start, n)
        self._nic_tail = (start + n) % ring.frame_nr
        return lost

    def _receive_odd(self, start, status, tp_len, snaplen, mac, fronted):
        """The slow path of _receive, frame by frame: a frame too big for its slot is
        received whole (TP_STATUS_COPY) into a spill area (the batch stops while
        all are out), one at an unusual offset is offered from where it is (its
        header moved to the front unless ``fronted`` says the batch's were:
        PacketRxRing.front_headers), and one that came
        with a VLAN tag gets it back (insert_vlan_tag).  One truncated without
        a copy (socket buffer full), or whose copy came truncated (over 64 KB),
        is dropped, but only once no frame is out, since frames go back to the
        kernel in ring order; until then the batch stops before it.  Returns
        (ids, lengths, frames taken)."""
        ring, txq, h = self.nic_ring, self.tap_txq, self.hdr_len
        ids, lengths, taken = [], [], 0
        for st, full, snap, off in zip(status, tp_len, snaplen, mac):
            f = start + taken
            desc = f % txq.num
            tag = ring.vlan(f) if st & TP_STATUS_VLAN_VALID else None
            buf = None
            if st & TP_STATUS_COPY and f != self._nic_lost:
                if not self._spills:            # each held by a frame out: back soon
                    break
                spill = self._spills[-1]
                own = self._spill_views[spill]  # received VLAN_HLEN in: room for a tag
                with contextlib.suppress(BlockingIOError):
                    nbytes, truncated = self.nic.recv_into(own[VLAN_HLEN:])
                    if truncated:               # its copy is gone: never receive for f again
                        self._nic_lost = f
                    else:
                        self._spill_of[desc] = self._spills.pop()
                        buf, base, hdr, length = (own, self._spill_base + spill * VHOST_BUF_SIZE,
                                                  VLAN_HLEN, nbytes)
            elif snap == full and off - h - (VLAN_HLEN if tag else 0) >= TPACKET2_HDRLEN \
                    and off + snap <= ring.frame_size:
                if not fronted:
                    ring.front_header(f, off)
                buf, base, hdr, length = ring.view, ring.addr, f * ring.frame_size + off - h, \
                    snap + h
            if buf is not None:
                if tag:
                    hdr = insert_vlan_tag(buf, hdr, h, *tag)
                    length += VLAN_HLEN
                txq.set_addr(desc, base + hdr)
                ids.append(desc)
                lengths.append(length)
            elif ids or txq.in_flight():
                break
            else:
                self.nic_stats.rx_dropped += 1
                ring.release(f, 1)
                self._nic_tail = (f + 1) % ring.frame_nr
                self._nic_lost = None
            taken += 1
        return ids, lengths, taken

    def _release(self):
        """Give the frames the tap device has used back to the kernel, in ring order."""
        tail, n, num = self._nic_tail, 0, self.queue_size
        while True:
            run = self.tap_txq.get_run()
            if run is None:
                break
            first, count, _ = run
            if first != (tail + n) % num:
                self.tap_txq.mark_broken("the tap TX ring used frames out of order")
            if self._spill_of:                  # spill areas of the frames used: free
                for desc_id in range(first, first + count):
                    spill = self._spill_of.pop(desc_id, None)
                    if spill is not None:
                        self._spills.append(spill)
            n += count
        if n:
            self.nic_ring.release(tail, n)
            self._nic_tail = (tail + n) % self.nic_ring.frame_nr

    def poll_once(self):
        """Pass over the rings until they are drained; return the packets forwarded.

        Interrupt moderation: while more than a quarter of a TX ring's
        buffers wait on it, that TX ring alone wakes us, once about 3/4 of
        them are sent (enable_cb_delayed), and then we also take what came
        in meanwhile; the device keeps sending the rest.  So a busy
        direction costs a wakeup per hundreds of packets, not per vhost
        batch (64).  Otherwise, outwards, the tap RX ring wakes us at its
        next packet, or the tap itself while that ring is unbound; inwards,
        the tap TX ring at its next used frame, or the packet socket (poll)
        once no frame is out.  Each avail->idx is
        published as soon as its ring is filled; the kicks go at the end of
        the pass, since a woken vhost worker may take this CPU.  While no
        frame is in flight, _pass_idle comes first and is often all there is
        to do.
        """
        num, taken = self.queue_size, self.tap_rxq.last_used_idx
        moved, calm = self._pass_idle() if self._rings_idle() else (0, False)
        full = not calm                         # the full pass runs, the tap RX ring bound
        if full and not self._tap_bound:
            self._bind_tap(True)
        while not calm:
            kicks = []
            self._release()
            moved += self._receive(kicks)
            moved += self._forward(kicks)
            self._recycle(kicks)
            for vq in kicks:
                vq.notify()
            if 4 * self.nic_txq.in_flight() > num:
                self.tap_rxq.disable_cb()
                calm = self.nic_txq.enable_cb_delayed()
            else:
                self.nic_txq.disable_cb()
                calm = self.tap_rxq.enable_cb()
            held = self.tap_txq.in_flight()
            if held:
                txq = self.tap_txq
                calm = (txq.enable_cb_delayed() if 4 * held > num else txq.enable_cb()) and calm
            else:
                self.tap_txq.disable_cb()
            self._nic_wait = not held
            calm = calm and not (self._nic_wait and self._nic_frame_waits())
        # The hold runs from the last pass that needed the worker: a full pass, or
        # one that took a run of frames it moved (small runs go on in _pass_idle
        # too).  Not a single frame: pings closer than TAP_BIND_HOLD would keep
        # the ring bound, each waking the worker, long after the burst that bound it.
        if full or (self.tap_rxq.last_used_idx - taken) & 0xFFFF > 1:
            self._hold_until = time.monotonic() + TAP_BIND_HOLD
        return moved

    def _nic_frame_waits(self):
        """Whether a frame waits at the packet ring's head: one the NIC brought
        meanwhile (often the answer to one just sent) is taken now rather than
        after a poll() that would return at once."""
        return self.nic_ring.ready(self._nic_head, 1)

    def _pass_idle(self):
        """poll_once while neither TX ring has a frame in flight (between a ping's
        frames, a request's): frame by frame from the packet ring (the usual
        kind, _write_usual), run by run from the tap RX ring (_forward_run) and,
        while that is unbound, frame by frame from the tap (_read_tap), straight
        to the tap or the NIC (DIRECT_BATCH), in turns, so that an answer that
        came back during a send goes on at once; then only the tap RX ring's
        interrupt needs setting again (while it is bound: unbound, the device
        uses no buffer).  The frames written to the tap and read from it are
        counted at the end, off an answer's path.  Returns (frames moved,
        settled): not settled at a burst from the NIC, a frame of another kind,
        frames put on a TX ring (a burst from the tap RX ring, a full socket
        buffer), or DIRECT_BATCH frames read from the tap: the full pass goes
        on from there, the tap RX ring bound."""
        ring, rxq, moved, settled = self.nic_ring, self.tap_rxq, 0, False
        written, refused, read, unsent = [], [], [], []    # lengths to the tap, from it
        try:
            while True:
                f = self._nic_head
                if ring.ready(f, 1):
                    # Two single looks: cheaper than ready(f, 2) on the answer's path.
                    if ring.ready((f + 1) % ring.frame_nr, 1) or \
                            not self._write_usual(f, written, refused):
                        break                   # a burst, or a frame of another kind
                    continue
                run = rxq.get_run(self._rx_min_len)
                if run is not None:
                    moved += self._forward_run(*run)
                    if self._rings_idle():
                        continue
                    break
                if not self._tap_bound:
                    if len(read) == DIRECT_BATCH:   # a burst from the kernel: to the worker
                        break
                    if self._read_tap(read, unsent):
                        continue
                rxq.kick()                      # buffers _send_nic gave back
                if (not self._tap_bound or rxq.enable_cb()) and not self._nic_frame_waits():
                    settled = True
                    break
        finally:                                # counted even when the bridge stops
            if written:
                self._count(self.nic_stats, self.tap_stats, written, refused, len(written))
            if read:
                self.tap_stats.rx_direct += len(read)
                self._count(self.tap_stats, self.nic_stats, read, unsent, len(read))
        if not settled:
            rxq.kick()
            self.nic_txq.kick()
        return moved + len(written) + len(read), settled

    def _read_tap(self, read, unsent):
        """Read the frame at the head of the tap's queue from here (its RX vring
        unbound: TAP_BIND_HOLD) and send it on the packet socket, its length
        added to ``read``, and to ``unsent`` too if the send failed; False if
        none waits.  No frame is in flight then, so none is overtaken."""
        try:
            length = os.readv(self.tap.fileno(), [self._tap_buf])
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno == errno.EBADFD:         # deleted since poll() (tun_chr_read_iter)
                raise self._tap_deleted() from None
            self.tap_stats.rx_dropped += 1      # one tun could not hand over (EINVAL: its
            return True                         # GSO type has no virtio_net_hdr): gone
        read.append(length)
        try:
            self._send_read(self._tap_view[:length])
        except OSError:     # the NIC down (ENETDOWN), a qdisc drop, still no room
            unsent.append(length)
        return True

    def _send_read(self, frame):
        """Send a frame read from the tap on the packet socket; a full send buffer is
        waited on (NIC_SEND_WAIT), then the error raised."""
        try:
            self.nic.send(frame)
        except BlockingIOError:
            select.select([], [self.nic], [], NIC_SEND_WAIT)
            self.nic.send(frame)

    def _bind_tap(self, bound):
        """Bind the tap's RX vring to its vhost worker again, or take it back and
        sleep on the tap instead (TAP_BIND_HOLD)."""
        try:
            self.vhost.set_backend(self.tap_rxq, bound)
        except OSError as e:
            # A deleted tap's fd polls EPOLLERR, which vhost_poll_start refuses (EINVAL).
            faults = select.poll()
            faults.register(self.tap.fileno(), 0)
            if faults.poll(0):
                raise self._tap_deleted() from e
            raise
        self._tap_bound = bound
        if bound:
            self.tap_stats.rx_binds += 1
        if self._poller is not None:
            self._poller.modify(self.tap.fileno(), 0 if bound else select.POLLIN)

    def _wake_at(self):
        """The tap RX vring bound, the rings idle: when TAP_BIND_HOLD is up, so it is
        unbound then without waiting for traffic."""
        return self._hold_until if self._tap_bound and self._rings_idle() else None

    def _poll_fds(self):
        # The packet ring polls readable while a frame is the user's (packet_poll):
        # level-triggered, so a frame that came before the poll is not missed; so
        # does the tap while a frame waits in its queue.
        self._nic_wait = True
        return {self.callfd: select.POLLIN, self.nic.fileno(): select.POLLIN,
                self.tap.fileno(): 0 if self._tap_bound else select.POLLIN}

    def _step(self, ready):
        # The call eventfd is read before the rings: a buffer used after the
        # read signals again, so no wakeup is lost.
        if ready and self.callfd in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self.callfd, 8)
        waited = self._nic_wait
        moved = self.poll_once()
        if self._nic_wait != waited:
            self._poller.modify(self.nic.fileno(), select.POLLIN if self._nic_wait else 0)
        # Busy-polling too: a window longer than the gaps in the traffic never
        # comes back to poll(), and a bound ring would wake the worker per frame.
        unbind_at = self._wake_at()
        if unbind_at is not None and time.monotonic() >= unbind_at:
            self._bind_tap(False)
        return moved


def open_bridge(config, nic, stack, tap=None, nic_stats=None, tap_stats=None, quiet_nic=True):
    """The forwarder ``config`` asks for, between ``nic`` (a PacketSocket) and a tap
    (``tap``, an opened Tap, or a new one): a VhostBridge for NIC I/O vhost-net,
    else a Bridge over a VirtioUserPort or a TapPort.  Every forwarder is built
    here; its clean-up, and its port's, goes on ``stack``."""
    if config.nic_io == "vhost-net":
        bridge = VhostBridge(nic, config, tap, nic_stats, tap_stats, quiet_nic)
    else:
        port_class = VirtioUserPort if config.tap_io == "vhost-net" else TapPort
        port = port_class(Config(**dict(config.options(), mac=config.tap_mac(nic))), tap,
                          tap_stats)
        stack.callback(port.close)
        bridge = Bridge(nic, port, nic_stats, quiet_nic)
    stack.callback(bridge.close)
    return bridge


########################################################################################
# Queue pairs: a worker process per pair
########################################################################################


class QueuePairs(_Closing):
    """N queue pairs, each bridged by its own worker process (DPDK's ``queues=N``).

    Queue pair i is tap queue i (IFF_MULTI_QUEUE), packet socket i of one
    PACKET_FANOUT group on the NIC and, with tap I/O vhost-net, its own
    /dev/vhost-net: its own kernel worker thread.  Threads would be serialised
    by Python's GIL, and vhost accepts ioctls only from the process that owns
    the device, so every worker process opens its own vhost fd after it
    starts.  The parent opens the tap queues and the sockets (the workers
    inherit them), keeps every counter in shared memory, and supervises.
    Workers die with the parent (PR_SET_PDEATHSIG), and the tap goes with the
    last of them (a persistent tap stays, put back as found once they are gone).

    Args:
        iface: the NIC.
        config: a Config (``config.queues`` pairs), or its keyword arguments instead.
        refresh: seconds between updates of each worker's socket drop counter.

    Raises:
        VhostPathError, OSError: set-up failed (a worker's error included);
        everything created is released.
    """

    def __init__(self, iface, config=None, refresh=1.0, **options):
        self.config = _config(config, options)
        self.queues, self.refresh = self.config.queues, refresh
        self.pids, self.status = [], {}
        self._stopping = False                  # stop() was called: workers may exit
        self._status_pipes = {}                 # read end of a worker's status pipe -> pid
        self._stack = contextlib.ExitStack()
        try:
            self._start(iface)
        except BaseException:
            self._stack.close()
            raise

    @property
    def name(self):
        """The tap's name as the first queue pair's worker last saw it: its
        statistics take it at every refresh and at its end, so a rename is
        followed."""
        return self.tap_stats[0].name

    def _start(self, iface):
        push, tap_name = self._stack.callback, self.config.tap
        multi = self.queues > 1
        flags_file = f"/sys/class/net/{tap_name}/tun_flags"
        if multi and os.path.exists(flags_file):
            with open(flags_file) as f:
                if not int(f.read(), 16) & IFF_MULTI_QUEUE:
                    raise VhostPathError(
                        f"{tap_name} is a single-queue tap: --queues {self.queues} needs a "
                        f"multi-queue one ('ip tuntap add {tap_name} mode tap multi_queue "
                        "vnet_hdr') or a new tap")
        # Put back as found (a persistent tap) once the workers are gone: _reap
        # is pushed after.
        taps = [_open_tap(self.config, push, multi_queue=multi)]
        self.tap_persistent = taps[0].persistent
        for _ in range(1, self.queues):
            taps.append(Tap(taps[0].name, multi_queue=True))
            push(taps[-1].close)
        group = os.getpid() & 0xFFFF if multi else None
        nics = []
        for _ in range(self.queues):
            nics.append(PacketSocket(iface, group, self.config.filter))
            push(nics[-1].close)
        # The device is configured once, here, its MAC first (an IPv6 link-local
        # address is made from it when it comes up); every queue is told its namespace.
        mac = self.config.tap_mac(nics[0])
        if mac is not None:
            taps[0].set_mac(mac)
        self.config.configure_tap(taps[0])
        for tap in taps[1:]:
            tap.netns = taps[0].netns
        self._share_stats(iface, nics[0].mtu(), taps[0].name)
        self.quiet = QuietNic(iface)
        push(self.quiet.restore)
        push(self._reap)
        parent = os.getpid()
        for i in range(self.queues):
            # Worker i alone holds the write end of its status pipe: its line says
            # whether set-up worked, and end of file says it exited (pidfd_open, its
            # alternative, needs Linux 5.3 and Python 3.9).
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
            # A stop signal waits until the child has its own handlers: the
            # parent's would unwind the parent's set-up in the child.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                pid = os.fork()
                if pid == 0:
                    os.close(status_r)
                    self._worker(i, taps, nics, status_w, parent, mask)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(status_w)
            push(os.close, status_r)
            self.pids.append(pid)
            self.status[pid] = None
            self._status_pipes[status_r] = pid
        # The workers own the queues now: the tap lives exactly as long as they do.
        for obj in taps + nics:
            obj.close()
        self._wait_ready()

    def _share_stats(self, iface, mtu, tap_name):
        """Every pair's counters, in memory the workers share with this process."""
        size = ctypes.sizeof(PortStats)
        shared = mmap.mmap(-1, 2 * size * self.queues, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.nic_stats = [PortStats.from_buffer(shared, 2 * i * size)
                          for i in range(self.queues)]
        self.tap_stats = [PortStats.from_buffer(shared, (2 * i + 1) * size)
                          for i in range(self.queues)]
        for nic_st, tap_st in zip(self.nic_stats, self.tap_stats):
            nic_st.name, nic_st.mtu = iface, mtu
            tap_st.name, tap_st.mtu = tap_name, None

    def _wait_ready(self):
        """One line per worker on its status pipe: "ok", or "error <why>"; end of file
        first: the worker died."""
        pending = dict(self._status_pipes)
        got = dict.fromkeys(pending, b"")
        while pending:
            for fd in select.select(list(pending), [], [])[0]:
                chunk = os.read(fd, 4096)
                got[fd] += chunk
                if not chunk or b"\n" in got[fd]:
                    del pending[fd]
        for fd, pid in self._status_pipes.items():
            line = got[fd].decode().partition("\n")[0]
            if not line:
                raise VhostPathError(f"queue worker {pid} died during set-up")
            if line != "ok":
                raise VhostPathError(line.partition(" ")[2])

    def _worker(self, index, taps, nics, status_w, parent, mask):
        """Queue pair ``index`` in a forked child, telling ``status_w`` how set-up went;
        the stop signals are blocked until its handlers are set (then ``mask``).
        Never returns."""
        status, bridge, told = 1, None, False

        def on_signal(*_):
            if bridge is None:
                raise KeyboardInterrupt
            bridge.stop()
        try:
            for sig in STOP_SIGNALS:
                signal.signal(sig, on_signal)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            _libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:            # the parent died before prctl
                return
            for k, (tap, nic) in enumerate(zip(taps, nics)):
                if k != index:
                    tap.close()
                    nic.close()
            for fd in self._status_pipes:         # the workers' before this one
                os.close(fd)
            with contextlib.ExitStack() as stack:
                bridge = open_bridge(self.config, nics[index], stack, taps[index],
                                     self.nic_stats[index], self.tap_stats[index],
                                     quiet_nic=False)
                os.write(status_w, b"ok\n")
                told = True
                if index == 0 and not bridge.carrier_follows:
                    print("vhostpath: warning: " + bridge.describe_following(),
                          file=sys.stderr, flush=True)
                bridge.run(self.refresh, type(bridge).refresh_stats)
                bridge.refresh_stats()
            status = 0
        except KeyboardInterrupt:
            pass
        except BaseException as e:
            msg = _describe_oserror(e, taps[index].name) if isinstance(e, OSError) else str(e)
            if not told:
                os.write(status_w, f"error queue {index}: {msg}\n".encode())
            else:
                print(f"vhostpath: queue {index}: {msg}", file=sys.stderr, flush=True)
        finally:
            if index == 0:
                self.quiet.restore()              # also when the parent was killed
            os._exit(status)

    def run(self, stats_interval=None, on_stats=None):
        """Supervise until every worker has exited; stop all when one fails.  Calls
        ``on_stats(self)`` every ``stats_interval`` seconds.

        Returns True if every worker exited cleanly after stop(); a worker that
        exits before (a failure, or a signal sent to it alone) stops the others.
        """
        poller = select.poll()
        for fd in self._status_pipes:
            poller.register(fd, select.POLLIN)      # end of file: the worker exited
        ticker = _Ticker(stats_interval)
        ok = True
        while any(s is None for s in self.status.values()):
            for fd, _ in poller.poll(ticker.timeout()):
                pid = self._status_pipes[fd]
                poller.unregister(fd)
                self.status[pid] = os.waitpid(pid, 0)[1]
                if self.status[pid] != 0 or not self._stopping:
                    ok = False
                    self.stop()
            if ticker.due() and on_stats:
                on_stats(self)
        return ok

    def stop(self):
        """Ask run() to return: every worker is asked to stop (SIGTERM); safe from a
        signal handler."""
        self._stopping = True
        for pid, status in self.status.items():
            if status is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    def _reap(self):
        """Stop and wait for workers still running (set-up failure or close())."""
        self.stop()
        for pid, status in self.status.items():
            if status is None:
                self.status[pid] = os.waitpid(pid, 0)[1]

    def close(self):
        """Stop the workers, wait for them, restore the NIC."""
        self._stack.close()

    def totals(self):
        """(NIC, tap) PortStats summed over the queue pairs."""
        nic = PortStats(self.nic_stats[0].name, self.nic_stats[0].mtu)
        tap = PortStats(self.name)
        for n, t in zip(self.nic_stats, self.tap_stats):
            nic.add(n)
            tap.add(t)
        return nic, tap

    def report(self):
        """Totals per port, testpmd style, then one line per queue pair."""
        nic, tap = self.totals()
        lines = [nic.report(0), tap.report(1)]
        if self.queues > 1:
            lines += [f"  queue {i}: {n.summary()} | {t.summary()}"
                      for i, (n, t) in enumerate(zip(self.nic_stats, self.tap_stats))]
        return "\n".join(lines)


########################################################################################
# Command line
########################################################################################


def _capabilities():
    """Effective capability mask of this process (from /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _ipv4_address(iface):
    """The NIC's (first) IPv4 address, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            out = fcntl.ioctl(s.fileno(), SIOCGIFADDR, bytes(_ifreq(iface)))
        except OSError:
            return None
    return socket.inet_ntoa(out[20:24])


def _add_switch(p, option, help):
    """``option`` and ``--no-...`` setting one value, None when neither is given
    (argparse.BooleanOptionalAction, which Python 3.8 and older lack)."""
    dest = option[2:].replace("-", "_")
    p.add_argument(option, dest=dest, action="store_const", const=True,
                   help=f"{help}; --no-{option[2:]} turns it off")
    p.add_argument("--no-" + option[2:], dest=dest, action="store_const", const=False,
                   help=argparse.SUPPRESS)


def _add_port_options(p):
    """The options of a path to the kernel; each is a Config keyword of the same name."""
    p.add_argument("--tap-io", choices=("auto", *Config.TAP_IO), default="auto",
                   help="how frames cross between the rings and the tap: vhost-net (a "
                        "kernel thread), read-write (this process), or auto: vhost-net when "
                        "--path exists, else read-write with a warning (default %(default)s)")
    p.add_argument("--nic-io", choices=Config.NIC_IO,
                   help="how frames cross between the NIC and the rings: vhost-net (the "
                        "packet socket's receive ring in, a second vhost-net device out; "
                        "Python moves descriptors only) or socket (recvmmsg/sendmmsg in this "
                        "process) (default: vhost-net with --tap-io vhost-net, else socket)")
    p.add_argument("--path", default="/dev/vhost-net",
                   help="vhost-net device (default %(default)s)")
    p.add_argument("--queue-size", type=int, default=256,
                   help="virtqueue entries, a power of two from 64 (default %(default)s; "
                        "1024 recommended)")
    p.add_argument("--tap", default="tap%d",
                   help="tap name, or a template the kernel completes (default %(default)s)")
    p.add_argument("--mac", help="MAC address for the tap, or 'nic' for the NIC's (default: "
                                 "the kernel's random one)")
    p.add_argument("--filter", metavar="FILE",
                   help="only frames this classic BPF program accepts go from the NIC to "
                        "the kernel (FILE: what 'tcpdump -ddd EXPR' prints, e.g. for "
                        "'arp or icmp or tcp port 179'); the rest are dropped in the NIC's "
                        "softirq (default: every frame)")
    p.add_argument("--busy-poll", type=int, default=0, metavar="USEC",
                   help="after a pass that moved frames, keep passing over the rings for "
                        f"USEC microseconds before sleeping, while traffic is {SPARSE_TRAFFIC}: "
                        "lower latency, more CPU under such traffic, none when idle "
                        "(default 0: off)")
    p.add_argument("--vhost-busy-poll", type=int, default=0, metavar="USEC",
                   help="let every vring's vhost worker spin USEC microseconds for new work "
                        "before sleeping; each holds a CPU meanwhile, worth it only where "
                        "the path has cores to spare (default 0: off)")
    _add_switch(p, "--lro", "large receive: the kernel hands over 64 KB TCP segments "
                            "(VIRTIO_NET_F_GUEST_TSO4/6), segmented on the way out "
                            "(default: on, unless --no-rx-cksum)")
    _add_switch(p, "--rx-cksum", "rx checksum offload: packets from the kernel may carry "
                                 "partial checksums (VIRTIO_NET_F_GUEST_CSUM), completed on "
                                 "the way out (default: on)")
    p.add_argument("-v", "--verbose", action="store_true", help="print set-up details")


def _build_parser():
    p = argparse.ArgumentParser(
        prog="vhostpath",
        description="Bridge a NIC to the Linux network stack through a tap served by "
                    "the kernel's vhost-net (virtio-user as exceptional path).",
        epilog="'vhostpath demo' shows the whole path on this host with nothing to set up; "
               "'vhostpath cleanup --iface NIC' puts back what a killed vhostpath changed "
               "on NIC.")
    p.add_argument("--iface", required=True, help="the NIC to bridge (AF_PACKET)")
    _add_port_options(p)
    p.add_argument("--address", action="append", default=[], metavar="CIDR",
                   help="an address for the tap, with its prefix length (192.0.2.1/24, "
                        "2001:db8::1/64); repeatable; brings the tap up")
    p.add_argument("--up", action="store_true", help="bring the tap up")
    p.add_argument("--netns", metavar="NAME",
                   help="move the tap into this network namespace ('ip netns add NAME')")
    p.add_argument("--queues", type=int, default=1,
                   help="queue pairs: one worker process, vhost-net device (kernel thread), "
                        f"tap queue and NIC socket each, 1 to {MAX_TAP_QUEUES} "
                        "(default %(default)s)")
    p.add_argument("--stats", type=float, metavar="SECONDS",
                   help="print one statistics line every SECONDS")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _preflight(args, iface=None):
    """What the host must offer (Linux, privileges, the NIC, a free tap name, the
    vhost-net device); resolves ``--tap-io auto``.  Returns a warning to print, or
    None.  Raises VhostPathError."""
    if not sys.platform.startswith("linux"):
        raise VhostPathError("vhostpath runs on Linux only (it needs /dev/vhost-net, "
                             f"tun/tap and AF_PACKET); this is {sys.platform}")
    caps = _capabilities()
    if not caps & (1 << CAP_NET_ADMIN) or not caps & (1 << CAP_NET_RAW):
        raise VhostPathError("permission denied: run as root (needs CAP_NET_ADMIN and "
                             "CAP_NET_RAW to create the tap and open a packet socket)")
    if iface is not None:
        try:
            socket.if_nametoindex(iface)
        except OSError:
            raise VhostPathError(f"--iface {iface}: no such network interface") from None
        if args.tap == iface:
            raise VhostPathError(f"--tap {args.tap} is the NIC itself")
    if getattr(args, "netns", None) and not os.path.exists(os.path.join(NETNS_DIR, args.netns)):
        raise VhostPathError(f"--netns {args.netns}: no such network namespace (create it "
                             f"with 'ip netns add {args.netns}')")
    tap = args.tap
    if "%" not in tap and _tap_name_valid(tap) and os.path.exists(f"/sys/class/net/{tap}") \
            and not os.path.exists(f"/sys/class/net/{tap}/tun_flags"):
        raise VhostPathError(f"--tap {tap}: a network interface of that name exists "
                             "and is not a tap device")
    missing = f"{args.path} does not exist: load the vhost-net driver with 'modprobe vhost_net'"
    if args.tap_io == "vhost-net" and not os.path.exists(args.path):
        raise VhostPathError(missing)
    if args.tap_io != "auto":
        return None
    if os.path.exists(args.path):
        args.tap_io = "vhost-net"
        return None
    if args.nic_io == "vhost-net":
        raise VhostPathError(f"--nic-io vhost-net: {missing}")
    if args.vhost_busy_poll:
        raise VhostPathError(f"--vhost-busy-poll: {missing}")
    args.tap_io = "read-write"
    return (f"warning: {missing}. Falling back to --tap-io read-write: this process moves "
            "every packet with read()/write() on the tap, with no vhost kernel thread, so "
            "throughput is lower")


def _config_from_args(args):
    """The Config of the parsed options; both offloads default on (the NIC, or the
    kernel's software GSO and checksum where the NIC lacks them, completes
    what the kernel hands over).  A ConfigError names the option."""
    if args.rx_cksum is None:
        args.rx_cksum = True
    if args.lro is None:
        args.lro = args.rx_cksum
    options = {name: getattr(args, name) for name in Config.OPTIONS if hasattr(args, name)}
    try:
        if options.get("filter") is not None:
            options["filter"] = load_filter(options["filter"])
        return Config(**options)
    except ConfigError as e:
        raise VhostPathError(f"--{e.option.replace('_', '-')}: {e.why}") from None


def _port_description(name, persistent, config):
    if persistent:
        made = f"{name} attached (a persistent tap: put back as found at exit)"
    else:
        made = f"{name} created ({'named by the kernel' if '%' in config.tap else 'as asked'})"
    if config.tap_io == "read-write":
        text = f"{made}, through read()/write() on the tap"
    else:
        text = f"{made}, through {config.path}, queue size {config.queue_size}"
    if config.queues > 1:
        if config.tap_io == "read-write":
            each = "a process"
        elif config.nic_io == "socket":
            each = "a vhost-net kernel thread"
        else:
            each = "two vhost-net kernel threads"
        text += f", {config.queues} queue pairs ({each} each)"
    return text


def _stats_line(nic, tap):
    return f"{time.strftime('%H:%M:%S')} {nic.summary()} | {tap.summary()}"


def _say(msg):
    print(f"vhostpath: {msg}", file=sys.stderr, flush=True)


def _on_signals(handler):
    """Each of STOP_SIGNALS calls ``handler()``."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: handler())


def _interrupt():
    """A stop signal during set-up or the demo: unwind what was made, as Ctrl-C does.
    (SIGINT too: a shell starts a background job with SIGINT ignored, and
    Python then keeps it ignored instead of raising KeyboardInterrupt.)"""
    raise KeyboardInterrupt


def _bridge_main(args):
    if args.stats is not None and not 0.1 <= args.stats <= 86400:     # also NaN
        raise VhostPathError(f"--stats: the period must be from 0.1 to 86400 seconds, "
                             f"not {args.stats}")
    _on_signals(_interrupt)          # before anything on the host changes
    warning = _preflight(args, args.iface)
    config = _config_from_args(args)
    if warning:
        _say(warning)
    _say_restored(args.iface, restore_nic(args.iface))
    if "%" not in config.tap:
        _say_tap_restored(config.tap)
    address = _ipv4_address(args.iface)
    if address:
        _say(f"warning: {args.iface} still has IPv4 address {address}: the kernel will "
             f"see its traffic twice (remove it with 'ip addr flush dev {args.iface}')")
    if config.queues > 1:
        return _queues_main(args, config)
    with contextlib.ExitStack() as stack:
        nic = PacketSocket(args.iface, program=config.filter)
        stack.callback(nic.close)
        bridge = open_bridge(config, nic, stack)
        _on_signals(bridge.stop)                     # before anyone is told we run
        print(f"{_port_description(bridge.name, bridge.tap.persistent, config)}, "
              f"bridging {args.iface} <-> {bridge.name}", flush=True)
        if args.verbose:
            for line in bridge.describe():
                _say(line)
            if config.filter:
                _say(f"filter: {len(config.filter)} BPF instructions on {args.iface}'s packet "
                     f"socket: only the frames they accept reach {bridge.name}")
        elif not bridge.carrier_follows:
            _say("warning: " + bridge.describe_following())

        def on_stats(b):
            b.refresh_stats()
            print(_stats_line(b.nic_stats, b.tap_stats), flush=True)
        bridge.run(args.stats, on_stats)
        print(bridge.report(), flush=True)
    return 0


def _say_restored(iface, restored):
    """Tell what restore_nic put back: a vhostpath on ``iface`` did not stop cleanly."""
    if restored:
        settings = ", ".join(f"{path[len('/proc/sys/'):].replace('/', '.')}={value}"
                             for path, value in restored.items())
        _say(f"put back {settings} (left changed by a vhostpath on {iface} that was killed)")


def _say_tap_restored(name):
    """restore_tap, told; returns whether it put anything back: a vhostpath on tap
    ``name`` did not stop cleanly."""
    if not restore_tap(name):
        return False
    _say(f"put back {name} as it was found (left changed by a vhostpath that was killed)")
    return True


def _cleanup_main(args):
    """``vhostpath cleanup --iface NIC --tap TAP`` (either or both): what a killed
    vhostpath changed, put back."""
    if args.iface is None and args.tap is None:
        raise VhostPathError("cleanup: name the NIC (--iface), the tap (--tap) or both")
    if not _capabilities() & (1 << CAP_NET_ADMIN):
        raise VhostPathError("permission denied: run as root")
    if args.iface is not None:
        restored = restore_nic(args.iface)
        _say_restored(args.iface, restored)
        if not restored:
            print(f"nothing to put back on {args.iface}", flush=True)
    if args.tap is not None and not _say_tap_restored(args.tap):
        print(f"nothing to put back on {args.tap}", flush=True)
    return 0


def _build_cleanup_parser():
    p = argparse.ArgumentParser(
        prog="vhostpath cleanup",
        description="Put back what a vhostpath that was killed (SIGKILL, OOM, a crash) "
                    f"changed on a NIC or a persistent tap, from its record under {STATE_DIR}.  "
                    "A normal stop, and the next start on the NIC or the tap, do this "
                    "themselves.")
    p.add_argument("--iface", help="the NIC")
    p.add_argument("--tap", help="the persistent tap")
    return p


def _queues_main(args, config):
    """--queues N > 1: a QueuePairs supervisor in this process."""
    with contextlib.ExitStack() as stack:
        pairs = QueuePairs(args.iface, config, refresh=min(args.stats or 1.0, 1.0))
        stack.callback(pairs.close)
        _on_signals(pairs.stop)
        print(f"{_port_description(pairs.name, pairs.tap_persistent, config)}, "
              f"bridging {args.iface} <-> {pairs.name}", flush=True)
        if args.verbose:
            for i, pid in enumerate(pairs.pids):
                _say(f"queue pair {i}: worker process {pid}")

        def on_stats(p):
            print(_stats_line(*p.totals()), flush=True)
            for i, (n, t) in enumerate(zip(p.nic_stats, p.tap_stats)):
                print(f"  queue {i}: {n.summary()} | {t.summary()}", flush=True)
        ok = pairs.run(args.stats, on_stats)
        print(pairs.report(), flush=True)
    if not ok:
        raise VhostPathError("a queue worker failed; all stopped")
    return 0


########################################################################################
# Demo: the whole path on this host, with an outside host in a network namespace
########################################################################################

DEMO_NS, DEMO_NIC, DEMO_PEER = "vhostpath-demo", "vpdemo0", "vpdemo1"
DEMO_KERNEL_IP, DEMO_OUTSIDE_IP = "198.18.0.1", "198.18.0.2"   # RFC 2544 test range
DEMO_PORT = 5201


def _ip(*args):
    """Run iproute2's ip; a failure is a VhostPathError with its message."""
    import subprocess
    r = subprocess.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    if r.returncode:
        raise VhostPathError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _inet_checksum(data):
    """The Internet checksum (RFC 1071) of ``data``, an even number of bytes: the
    ones' complement sum folded until no carry is left (one fold can carry)."""
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo_request(ident, seq):
    """An ICMP echo request message (RFC 792), its checksum done."""
    body = struct.pack("!HHHH", 8 << 8, 0, ident, seq) + b"vhostpath-demo"
    return body[:2] + struct.pack("!H", _inet_checksum(body)) + body[4:]


def _ping(address, count=3, timeout=5.0):
    """ICMP echo from this network namespace (raw socket); returns replies received."""
    ident, received = os.getpid() & 0xFFFF, 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        for seq in range(1, count + 1):
            s.sendto(_echo_request(ident, seq), (address, 0))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not select.select([s], [], [], deadline - time.monotonic())[0]:
                    break
                reply = s.recv(2048)
                icmp = reply[(reply[0] & 15) * 4:]
                if icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
                    received += 1
                    break
    return received


def _demo_peer(ready_w, nbytes):
    """The outside host, in a child process inside the demo namespace.

    Echoes one TCP connection of ``nbytes``, then pings the kernel side and
    writes "pings N" to ``ready_w``.  Never returns.
    """
    status = 1
    try:
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)   # die with the demo, always
        with open(f"/run/netns/{DEMO_NS}") as ns:
            _setns(ns.fileno())
        with socket.socket() as srv:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((DEMO_OUTSIDE_IP, DEMO_PORT))
            srv.listen()
            os.write(ready_w, b"ready\n")
            srv.settimeout(60)
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(60)
                buf = bytearray(1 << 16)
                for n in iter(lambda: conn.recv_into(buf), 0):
                    conn.sendall(memoryview(buf)[:n])
        os.write(ready_w, b"pings %d\n" % _ping(DEMO_KERNEL_IP))
        status = 0
    finally:
        os._exit(status)


def _demo_echo(nbytes):
    """Send ``nbytes`` through the path to the peer's echo; return (ok, seconds)."""
    import hashlib
    import threading
    data = os.urandom(nbytes)
    got = hashlib.sha256()
    start = time.monotonic()
    with socket.create_connection((DEMO_OUTSIDE_IP, DEMO_PORT), timeout=60) as conn:
        def send():
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        total, buf = 0, bytearray(1 << 16)
        for n in iter(lambda: conn.recv_into(buf), 0):
            got.update(memoryview(buf)[:n])
            total += n
        sender.join(60)
    return total == nbytes and got.digest() == hashlib.sha256(data).digest(), \
        time.monotonic() - start


def _demo_outside(stack):
    """The outside host: namespace DEMO_NS behind a veth pair whose near end plays
    the NIC; removed by ``stack``."""
    _ip("netns", "add", DEMO_NS)
    stack.callback(_ip, "netns", "del", DEMO_NS)
    _ip("link", "add", DEMO_NIC, "type", "veth", "peer", "name", DEMO_PEER, "netns", DEMO_NS)
    # Deleted explicitly: a namespace's devices go asynchronously after 'netns del'.
    stack.callback(_ip, "link", "del", DEMO_NIC)
    for cmd in (("link", "set", DEMO_NIC, "up"), ("-n", DEMO_NS, "link", "set", "lo", "up"),
                ("-n", DEMO_NS, "addr", "add", f"{DEMO_OUTSIDE_IP}/24", "dev", DEMO_PEER),
                ("-n", DEMO_NS, "link", "set", DEMO_PEER, "up")):
        _ip(*cmd)


def _demo_start_peer(stack, nbytes):
    """Fork the outside host's process (_demo_peer) once it listens; returns the
    file its lines come on.  ``stack`` kills and reaps it."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()                     # before any thread exists: fork and threads do not mix
    if pid == 0:
        os.close(ready_r)
        _demo_peer(ready_w, nbytes)
    os.close(ready_w)
    stack.callback(os.waitpid, pid, 0)
    stack.callback(os.kill, pid, signal.SIGKILL)     # done or not, it must go
    peer = os.fdopen(ready_r)
    stack.callback(peer.close)
    if peer.readline() != "ready\n":
        raise VhostPathError("the outside host did not start")
    return peer


def _demo_main(args):
    """Build an outside host, bridge it, ping and transfer through the path, clean up."""
    import shutil
    import threading
    if args.bytes < 1:
        raise VhostPathError(f"--bytes: must be at least 1, not {args.bytes}")
    warning = _preflight(args)
    config = _config_from_args(args)
    if shutil.which("ip") is None:
        raise VhostPathError("demo needs the 'ip' command (package iproute2)")
    if os.path.exists(f"/run/netns/{DEMO_NS}") or os.path.exists(f"/sys/class/net/{DEMO_NIC}"):
        raise VhostPathError(f"namespace {DEMO_NS} or veth {DEMO_NIC} exists: another demo is "
                             f"running, or a killed one left it ('ip netns del {DEMO_NS}; "
                             f"ip link del {DEMO_NIC}')")
    _on_signals(_interrupt)

    def step(msg):
        print(f"demo: {msg}", flush=True)
    if warning:
        _say(warning)
    with contextlib.ExitStack() as stack:
        _demo_outside(stack)
        step(f"outside host {DEMO_OUTSIDE_IP} in namespace {DEMO_NS}, behind veth "
             f"{DEMO_PEER}; its near end {DEMO_NIC} plays the NIC")
        peer = _demo_start_peer(stack, args.bytes)
        nic = PacketSocket(DEMO_NIC, program=config.filter)
        stack.callback(nic.close)
        config = Config(**dict(config.options(), address=[f"{DEMO_KERNEL_IP}/24"]))
        bridge = open_bridge(config, nic, stack)
        tap = bridge.name
        worker = threading.Thread(target=bridge.run, name="bridge", daemon=True)
        worker.start()
        stack.callback(worker.join, 10)
        stack.callback(bridge.stop)
        step(f"{_port_description(tap, bridge.tap.persistent, config)}, "
             f"bridging {DEMO_NIC} <-> {tap}; the kernel side is {DEMO_KERNEL_IP} on {tap}")
        for line in bridge.describe():
            step(line)
        replies = _ping(DEMO_OUTSIDE_IP)
        step(f"ping {DEMO_OUTSIDE_IP} (outside) from the kernel side: {replies}/3 replies")
        good, seconds = _demo_echo(args.bytes)
        step(f"TCP: {args.bytes} bytes to the outside host and echoed back in {seconds:.1f} s "
             f"({2 * 8 * args.bytes / seconds / 1e6:.0f} Mb/s both ways together), sha256 "
             + ("matches" if good else "DIFFERS"))
        answer = peer.readline().split()
        back = int(answer[1]) if answer[:1] == ["pings"] else 0
        step(f"ping {DEMO_KERNEL_IP} (kernel side) from the outside host: {back}/3 replies")
        bridge.stop()
        worker.join(10)
        print(bridge.report(), flush=True)
        ok = replies == 3 and back == 3 and good
    step("removed the namespace, the veth pair and the tap" if ok else
         "FAILED; removed the namespace, the veth pair and the tap")
    return 0 if ok else 1


def _build_demo_parser():
    p = argparse.ArgumentParser(
        prog="vhostpath demo",
        description="Create an outside host (a network namespace behind a veth pair), "
                    "bridge it to the kernel through a tap, ping both ways, run a TCP "
                    "transfer, print what happened, and remove everything.")
    _add_port_options(p)
    p.add_argument("--bytes", type=int, default=4 << 20,
                   help="TCP bytes to send and get echoed (default %(default)s)")
    return p


########################################################################################
# main
########################################################################################


def main(argv=None):
    """Command-line entry point: ``vhostpath --iface NIC ...``, ``vhostpath demo`` or
    ``vhostpath cleanup --iface NIC``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"demo": (_build_demo_parser, _demo_main),
                "cleanup": (_build_cleanup_parser, _cleanup_main)}
    command = argv[0] if argv and argv[0] in commands else None
    build, run = commands.get(command, (_build_parser, _bridge_main))
    args = build().parse_args(argv[1:] if command else argv)
    try:
        return run(args) or 0
    except VhostPathError as e:
        _say(str(e))
    except OSError as e:
        _say(_describe_oserror(e, getattr(args, "tap", "?")))
    except KeyboardInterrupt:
        _say("interrupted; everything created was removed")
    return 1


if __name__ == "__main__":
    sys.exit(main())
