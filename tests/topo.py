"""Test topology for the guest tier: an outside host behind a veth pair, and the tool.

    root namespace                               namespace "outside"
    kernel stack 1.1.1.1/24 on tap0              1.1.1.2/24 on veth1
          |                                          |
    tap0 <-vhost-net-> vhostpath <-AF_PACKET-> veth0 ===== veth1
"""

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import vhostpath as vp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "vhostpath.py")
NS = "outside"
KERNEL_IP, OUTSIDE_IP = "1.1.1.1", "1.1.1.2"


def run(cmd, **kw):
    """subprocess.run with stdout and stderr captured as text (capture_output and text=
    need Python 3.7; the tests run on 3.6 too)."""
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, **kw)


def as_user(uid):
    """A preexec_fn that runs the child as ``uid``, in group ``uid`` and no other
    (subprocess's user=, group= and extra_groups= need Python 3.9)."""
    def demote():
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    return demote


NOBODY = 65534


@contextlib.contextmanager
def readable_copy():
    """A copy of vhostpath.py that any user may read and run, removed afterwards: the
    checkout may sit where only root can read (under /root, mode 700)."""
    folder = tempfile.mkdtemp(prefix="vhostpath-copy-")
    try:
        os.chmod(folder, 0o755)
        copy = os.path.join(folder, "vhostpath.py")
        shutil.copy(TOOL, copy)
        os.chmod(copy, 0o644)
        yield copy
    finally:
        shutil.rmtree(folder)


def sh(*cmd, check=True, timeout=120, ns=None, input=None):
    """Run a command (optionally in the outside namespace: ``ip -n`` for ip itself, one
    process, not two as ``ip netns exec``); return its stdout."""
    if ns:
        cmd = ("ip", "-n", ns, *cmd[1:]) if cmd[0] == "ip" else ("ip", "netns", "exec", ns, *cmd)
    r = run(cmd, timeout=timeout, input=input)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def unprivileged_python():
    """A Python interpreter that uid 65534 may execute (pyenv under /root may not be)."""
    for exe in (sys.executable, "/usr/bin/python3"):
        try:
            r = run([exe, "-c", "pass"], preexec_fn=as_user(NOBODY))
        except PermissionError:
            continue
        if r.returncode == 0:
            return exe
    raise AssertionError("no Python interpreter runnable by uid 65534")


def interfaces():
    return set(os.listdir("/sys/class/net"))


def link_state(dev):
    """(MTU, MAC, up, addresses) of ``dev``: what a tool must leave as it found it."""
    link = sh("ip", "-o", "link", "show", dev)
    flags = re.search(r"<([^>]*)>", link).group(1).split(",")
    addresses = re.findall(r" inet6? (\S+)", sh("ip", "-o", "addr", "show", "dev", dev))
    return (re.search(r" mtu (\d+)", link).group(1), re.search(r"link/ether (\S+)", link).group(1),
            "UP" in flags, sorted(addresses))


def neighbour(address, ns=None):
    """The MAC address a neighbour table entry gives ``address``, or None."""
    m = re.search(r"lladdr (\S+)", sh("ip", "neigh", "show", address, ns=ns))
    return m and m.group(1)


def persistent_tap(test, name, *mode):
    """A persistent tap ``name`` (``ip tuntap add``, ``mode`` such as multi_queue) as a
    user might keep one: MTU 1400, a fixed MAC, an IPv4 and an IPv6 address (which
    a link going down takes away), down; removed after ``test``.  Returns its
    link_state."""
    sh("ip", "tuntap", "add", name, "mode", "tap", "vnet_hdr", *mode)
    test.addCleanup(sh, "ip", "link", "del", name, check=False)
    sh("ip", "link", "set", name, "mtu", "1400", "address", "02:11:22:33:44:55")
    for address in ("10.7.7.1/24", "fd00:7::1/64"):
        sh("ip", "addr", "add", address, "dev", name)
    return link_state(name)


def ip_batch(*commands, ns=None, check=True):
    """iproute2 ``commands`` (without "ip") in one process (``ip -batch``): each
    process start costs a guest under TCG a tenth of a second or more.  With
    ``check`` False, one failing does not stop the rest (-force)."""
    sh("ip", *(() if check else ("-force",)), "-batch", "-", ns=ns, check=check,
       input="".join(c + "\n" for c in commands))


def make_outside(offloads=True, gro=False):
    """Create veth0 (the NIC, here) and veth1 (the outside host, 1.1.1.2/24).

    offloads=False: ``ethtool -K veth1 tx off`` (TSO goes with it); gro=True: GRO on
    both veth ends, so the outside aggregates what it receives.
    """
    remove_outside()
    ip_batch("netns add " + NS, f"link add veth0 type veth peer name veth1 netns {NS}",
             "link set veth0 up")
    ip_batch("link set lo up", f"addr add {OUTSIDE_IP}/24 dev veth1", "link set veth1 up",
             ns=NS)
    if not offloads:        # a plain 1500-byte wire: full checksums, no TSO super-frames
        sh("ethtool", "-K", "veth1", "tx", "off", ns=NS)
    if gro:
        sh("ethtool", "-K", "veth1", "gro", "on", ns=NS)
        sh("ethtool", "-K", "veth0", "gro", "on")


VLAN_ID = 100
VLAN_KERNEL_IP, VLAN_OUTSIDE_IP = "1.1.100.1", "1.1.100.2"


def add_vlans(kernel_dev="tap0"):
    """802.1Q interfaces (VLAN_ID) on both ends: ``kernel_dev``.100 here, veth1.100
    outside, on their own subnet (needs the 8021q module)."""
    vlan = f"{kernel_dev}.{VLAN_ID}"
    sh("ip", "link", "add", "link", kernel_dev, "name", vlan, "type", "vlan", "id", str(VLAN_ID))
    sh("ip", "link", "add", "link", "veth1", "name", f"veth1.{VLAN_ID}", "type", "vlan",
       "id", str(VLAN_ID), ns=NS)
    sh("ip", "addr", "add", f"{VLAN_KERNEL_IP}/24", "dev", vlan)
    sh("ip", "link", "set", vlan, "up")
    sh("ip", "addr", "add", f"{VLAN_OUTSIDE_IP}/24", "dev", f"veth1.{VLAN_ID}", ns=NS)
    sh("ip", "link", "set", f"veth1.{VLAN_ID}", "up", ns=NS)


def remove_vlans(kernel_dev="tap0"):
    sh("ip", "link", "del", f"{kernel_dev}.{VLAN_ID}", check=False)
    sh("ip", "link", "del", f"veth1.{VLAN_ID}", ns=NS, check=False)


def remove_outside():
    # The veth first: a namespace's devices go asynchronously after 'netns del'.
    ip_batch("link del veth0", "netns del " + NS, check=False)


# What vhostpath sets on the NIC while it runs (its QuietNic), read independently of it.
NIC_SETTINGS = ("ipv4/conf/{}/arp_ignore", "ipv4/conf/{}/rp_filter", "ipv6/conf/{}/disable_ipv6")
QUIET = {"arp_ignore": "8", "rp_filter": "1", "disable_ipv6": "1"}


def nic_settings(iface="veth0"):
    """{arp_ignore: value, rp_filter: value, disable_ipv6: value} of ``iface`` now."""
    values = {}
    for path in NIC_SETTINGS:
        with open("/proc/sys/net/" + path.format(iface)) as f:
            values[path.rpartition("/")[2]] = f.read().strip()
    return values


def configure_tap(name="tap0", address=f"{KERNEL_IP}/24"):
    sh("ip", "addr", "add", address, "dev", name)
    sh("ip", "link", "set", name, "up")


def _scan_proc(name, match):
    """Pids whose /proc/<pid>/<name> text satisfies ``match``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/{name}") as f:
                    if match(f.read()):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def vhost_threads(pid):
    """vhost worker threads serving process ``pid``, named vhost-<pid>: kernel threads
    before Linux 6.4, threads of the process itself since (vhost_task)."""
    found = _scan_proc("comm", lambda text: text.strip() == f"vhost-{pid}")
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip() == f"vhost-{pid}":
                    found.append(int(tid))
        except OSError:
            pass
    return found


def vhost_tasks(pid):
    """The /proc directories of ``pid``'s vhost worker threads (vhost_threads)."""
    return [f"/proc/{pid}/task/{t}" if os.path.exists(f"/proc/{pid}/task/{t}") else f"/proc/{t}"
            for t in vhost_threads(pid)]


def cpu_seconds(pid):
    """User + system CPU of ``pid``, its children and its vhost worker threads."""
    if pid is None:
        return 0.0
    total = 0
    for p in [pid, *children(pid)]:
        # vhost threads of the process itself (Linux 6.4+) are in its own figures.
        for t in [p, *(t for t in vhost_threads(p) if not os.path.exists(f"/proc/{p}/task/{t}"))]:
            try:
                with open(f"/proc/{t}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                total += int(fields[11]) + int(fields[12])
            except OSError:
                pass
    return total / os.sysconf("SC_CLK_TCK")


def sleeps(task):
    """Voluntary context switches (sleeps that a wakeup ended) of one task, a
    /proc/PID or /proc/PID/task/TID directory; 0 once it is gone."""
    try:
        with open(f"{task}/status") as f:
            return next(int(line.split()[1]) for line in f
                        if line.startswith("voluntary_ctxt_switches:"))
    except (OSError, StopIteration):
        return 0


def wakeups(pid):
    """sleeps() of ``pid``'s threads, its children's, and its vhost worker threads:
    what a packet costs in wakeups."""
    if pid is None:
        return 0
    total = 0
    for p in [pid, *children(pid)]:
        try:
            tasks = [f"/proc/{p}/task/{t}" for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            continue
        tasks += [f"/proc/{t}" for t in vhost_threads(p) if not os.path.exists(f"/proc/{p}/task/{t}")]
        total += sum(map(sleeps, tasks))
    return total


def socket_mappings(pid):
    """Sizes of the socket mappings of ``pid`` (a packet socket's receive ring)."""
    sizes = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if line.rstrip().endswith("]") and " socket:[" in line:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                sizes.append(end - start)
    return sizes


def children(pid):
    """Pids of the processes whose parent is ``pid``."""
    return _scan_proc("stat", lambda text: int(text.rpartition(")")[2].split()[1]) == pid)


def tap_queues(name="tap0"):
    """Number of queues the kernel shows for a (multi-queue) tap."""
    return len([q for q in os.listdir(f"/sys/class/net/{name}/queues") if q.startswith("rx-")])


def queue_counters(report):
    """[(nic rx packets, nic tx packets)] per queue pair from the final report."""
    return [(int(rx), int(tx)) for rx, tx in
            re.findall(r"queue \d+: \S+: rx (\d+) pkts .*?, tx (\d+) pkts", report)]


def iperf3(parallel, seconds, reverse=False):
    """iperf3 TCP from the kernel side to the outside (reverse: back); Mb/s received."""
    import json
    server = subprocess.Popen(["ip", "netns", "exec", NS, "iperf3", "-s", "-1", "--forceflush"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_until(server.stdout, "listening", 60, "the iperf3 server to start")
        out = sh("iperf3", "-c", OUTSIDE_IP, "-P", str(parallel), "-t", str(seconds), "-J",
                 *(["-R"] if reverse else []), timeout=seconds + 120)
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        server.kill()
        server.wait()


def counter(dev, name, ns=None):
    """An interface counter from sysfs (rx_packets, tx_packets, ...)."""
    return int(sh("cat", f"/sys/class/net/{dev}/statistics/{name}", ns=ns))


def _pgset(path, cmd, ns=None, timeout=60):
    sh("sh", "-c", f"echo '{cmd}' > {path}", ns=ns, timeout=timeout)


def pktgen(inbound, dev, count, timeout=600):
    """Send ``count`` 64-byte UDP frames as fast as the kernel's pktgen can, each
    numbered (pktgen_hdr's seq_num at byte 46): from the
    outside veth1 to the kernel side ``dev`` (inbound) or back; return the seconds the
    sending took (the tail may still be on its way).  pktgen waits while the device
    refuses frames (a stuck tap): after ``timeout`` s it is stopped, and that fails."""
    if inbound:
        send_ns, send_dev, recv_ns, recv_dev, dst = NS, "veth1", None, dev, KERNEL_IP
    else:
        send_ns, send_dev, recv_ns, recv_dev, dst = None, dev, NS, "veth1", OUTSIDE_IP
    mac = sh("cat", f"/sys/class/net/{recv_dev}/address", ns=recv_ns).strip()
    pg = "/proc/net/pktgen"
    _pgset(f"{pg}/kpktgend_0", "rem_device_all", send_ns)
    _pgset(f"{pg}/kpktgend_0", f"add_device {send_dev}", send_ns)
    for cmd in (f"count {count}", "clone_skb 0", "pkt_size 60", "delay 0", f"dst {dst}",
                f"dst_mac {mac}", "udp_dst_min 9", "udp_dst_max 9"):
        _pgset(f"{pg}/{send_dev}", cmd, send_ns)
    start = time.monotonic()
    try:
        _pgset(f"{pg}/pgctrl", "start", send_ns, timeout)
    except subprocess.TimeoutExpired:
        _pgset(f"{pg}/pgctrl", "stop", send_ns)
        raise AssertionError(f"pktgen could not send {count} frames on {send_dev} "
                             f"within {timeout} s") from None
    finally:
        _pgset(f"{pg}/kpktgend_0", "rem_device_all", send_ns)
    return time.monotonic() - start


def wait_until(predicate, timeout, what):
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def read_until(stream, needle, timeout, what):
    """Lines from ``stream`` until one holds ``needle``; AssertionError naming ``what``
    at end of file or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        line = readline(stream, deadline)
        if line is None:
            raise AssertionError(f"no {what} within {timeout} s")
        if needle in line:
            return line


def readline(stream, deadline):
    """One line from a pipe, or None at EOF or once ``deadline`` (monotonic) passes."""
    fd = stream.fileno()
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1)
        if not chunk:
            return line.decode() or None
        line += chunk
    return line.decode()


def reap(proc):
    """Kill ``proc`` if it still runs, and collect it and its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()
    for pipe in (proc.stdout, proc.stderr):
        if pipe:
            pipe.close()


@contextlib.contextmanager
def popen(args):
    """``args`` started with its output captured; reaped on leaving the block."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        reap(proc)


def interrupt(proc, sig, timeout):
    """Send ``sig`` to ``proc``; its (stdout, stderr) once it exits.  AssertionError
    (and the process killed) if it still runs ``timeout`` seconds later."""
    proc.send_signal(sig)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        reap(proc)
        raise AssertionError(f"{' '.join(map(str, proc.args))} ignored signal {sig} "
                             f"for {timeout} s") from None


def tool_command(python=sys.executable, tool=TOOL):
    """The command that starts vhostpath.  The checkout's file runs as ``python -m
    vhostpath`` (from the checkout, where tests/run.py works): the same file as the
    same __main__, with the same argv[0], but from the bytecode tests/run.py
    compiled once, where a TCG guest would spend 1-2 s compiling it at every
    start.  A copy elsewhere (``tool``) runs as a script."""
    return [python, "-m", "vhostpath"] if tool == TOOL else [python, tool]


class Tool:
    """vhostpath started as a user would, with its output captured."""

    def __init__(self, *args, timeout=60, user=None, python=sys.executable, tool=TOOL):
        kw = {"preexec_fn": as_user(user)} if user is not None else {}
        self.proc = subprocess.Popen([*tool_command(python, tool), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, **kw)
        self.first_line = readline(self.proc.stdout, time.monotonic() + timeout)
        if self.first_line is None or not re.search(r" (created|attached) ", self.first_line):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"vhostpath did not start: {self.first_line!r} "
                                 f"{err.decode().strip()}")

    def readline(self, timeout):
        """The next line the tool prints, or None after ``timeout`` seconds."""
        return readline(self.proc.stdout, time.monotonic() + timeout)

    @property
    def pid(self):
        return self.proc.pid

    def stop(self, sig=signal.SIGINT, timeout=60):
        """Signal the tool; return (exit status, stdout after the first line, stderr)."""
        out, err = interrupt(self.proc, sig, timeout)
        return self.proc.returncode, out.decode(), err.decode()

    def exit_cpu(self, timeout):
        """Wait for the tool to exit by itself; return (exit status, stderr, CPU seconds
        it used in all), the last from its rusage.  AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"vhostpath still runs {timeout} s later")
            time.sleep(0.05)
        self.proc.returncode = os.WEXITSTATUS(status) if os.WIFEXITED(status) \
            else -os.WTERMSIG(status)
        return (self.proc.returncode, self.proc.stderr.read().decode(),
                usage.ru_utime + usage.ru_stime)

    def kill(self):
        reap(self.proc)


def report_counters(report):
    """{port name: {RX-packets: n, ...}} parsed from the tool's final statistics."""
    ports, current = {}, None
    for line in report.splitlines():
        m = re.search(r"Forward statistics for port \d+ \((\S+)\)", line)
        if m:
            current = ports.setdefault(m.group(1), {})
        elif current is not None:
            for key, value in re.findall(r"([RT]X-[\w-]+):\s+(\d+)", line):
                current[key] = int(value)
    return ports


def checksum_errors(ns=None):
    """{'Tcp.InCsumErrors': n, ...} from /proc/net/snmp of the root or the outside namespace."""
    text = sh("cat", "/proc/net/snmp", ns=ns)
    counters = {}
    lines = text.splitlines()
    for head, values in zip(lines[::2], lines[1::2]):
        proto = head.split(":")[0]
        for key, value in zip(head.split()[1:], values.split()[1:]):
            if "Csum" in key or key == "InErrs":
                counters[f"{proto}.{key}"] = int(value)
    return counters


def ping(target, ns=None, count=3, size=None, wait=5, interval=0.2):
    """Ping ``target``, ``interval`` seconds apart; return the number of replies, each
    waited for up to ``wait`` seconds.  ``size``: ICMP payload bytes, sent with DF
    (never fragmented)."""
    sized = ["-s", str(size), "-M", "do"] if size else []
    out = sh("ping", "-c", str(count), "-i", str(interval), "-W", str(wait), *sized, target,
             ns=ns, check=False, timeout=60)
    m = re.search(r"(\d+) received", out)
    return int(m.group(1)) if m else 0


def udp_gso_send(count=40, size=1400, port=5002):
    """From the kernel side, ``count`` UDP datagrams of ``size`` bytes to the outside in
    one send (one UDP GSO super-frame: UDP_SEGMENT, Linux 4.18); return (sent,
    received), each "<datagrams> <sha256>" of the datagrams in order."""
    import hashlib
    udp_segment = 103                           # linux/udp.h, at level SOL_UDP
    data = os.urandom(count * size)
    with vp.socket_in_netns(NS, socket.AF_INET, socket.SOCK_DGRAM) as rx, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind(("0.0.0.0", port))
        rx.settimeout(30)
        tx.setsockopt(socket.IPPROTO_UDP, udp_segment, size)
        tx.sendto(data, (OUTSIDE_IP, port))
        digest, got = hashlib.sha256(), 0
        with contextlib.suppress(socket.timeout):
            while got < count:
                digest.update(rx.recv(65536))
                got += 1
    return f"{count} {hashlib.sha256(data).hexdigest()}", f"{got} {digest.hexdigest()}"


def kernel_at_least(major, minor):
    """Whether the running kernel is ``major``.``minor`` or later."""
    import platform
    return tuple(int(x) for x in platform.release().split(".")[:2]) >= (major, minor)


def tcp_transfer(direction, nbytes, port=5001, timeout=300, kernel_ip=KERNEL_IP,
                 outside_ip=OUTSIDE_IP, kernel_ns=None):
    """Send ``nbytes`` random bytes over TCP through the path; return (sent, received),
    each "<bytes> <sha256>" as its end counted them.

    direction "in": outside -> kernel (1.1.1.1, in namespace ``kernel_ns`` if given);
    "out": kernel -> outside.  Both ends are sockets of this process, made in
    their namespaces (no interpreter to start per transfer).
    """
    import hashlib
    import threading
    recv_ns, send_ns, target = (kernel_ns, NS, kernel_ip) if direction == "in" \
        else (NS, kernel_ns, outside_ip)
    received = []

    def receive(conn):
        with conn:
            conn.settimeout(timeout)
            digest, total, buf = hashlib.sha256(), 0, bytearray(1 << 16)
            for n in iter(lambda: conn.recv_into(buf), 0):
                digest.update(memoryview(buf)[:n])
                total += n
        received.append(f"{total} {digest.hexdigest()}")

    with vp.socket_in_netns(recv_ns, socket.AF_INET, socket.SOCK_STREAM) as srv, \
            vp.socket_in_netns(send_ns, socket.AF_INET, socket.SOCK_STREAM) as cli:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", port))
        srv.listen(1)                   # the handshake completes without accept()
        srv.settimeout(timeout)
        cli.settimeout(timeout)
        cli.connect((target, port))
        conn = srv.accept()[0]
        receiver = threading.Thread(target=receive, args=(conn,))
        receiver.start()
        try:
            digest, total = hashlib.sha256(), 0
            while total < nbytes:
                chunk = os.urandom(min(1 << 20, nbytes - total))
                cli.sendall(chunk)
                digest.update(chunk)
                total += len(chunk)
            cli.shutdown(socket.SHUT_WR)
            receiver.join(timeout)
        finally:
            if receiver.is_alive():         # unblock it: no thread outlives the transfer
                conn.shutdown(socket.SHUT_RDWR)
                receiver.join()
        if not received:
            raise AssertionError(f"the receiver had not finished after {timeout} s")
    return f"{total} {digest.hexdigest()}", received[0]