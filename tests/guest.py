"""Boot a QEMU guest (TCG) with Debian's kernel and run one command in it, with real vhost-net.

The guest is a tiny initramfs (static busybox and the needed kernel modules)
that mounts the host's ``/`` read-only over 9p as the lower layer of an overlay
with a tmpfs on top, so it runs the host's Python, tools and this checkout.  A
second, writable 9p share (``/mnt/results`` inside) carries results back.

Used by tests/run.py (the guest tier) and tests/bench.py.  Test infrastructure
only: vhostpath.py never needs any of this.
"""

import glob
import gzip
import lzma
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

PACKAGES = {                      # Debian package -> a file that shows it is installed
    "gcc": "/usr/bin/gcc",        # host tier: the ABI cross-check
    "linux-libc-dev": "/usr/include/linux/vhost.h",
    "qemu-system-x86": "/usr/bin/qemu-system-x86_64",
    "busybox-static": "/bin/busybox",
    "iproute2": "/usr/sbin/ip",
    "iputils-ping": "/usr/bin/ping",
    "ethtool": "/usr/sbin/ethtool",
    "iperf3": "/usr/bin/iperf3",
}

# The guest kernels, by series: Debian bookworm's default (6.1) and its 6.12, each
# installed from its package when missing and chosen by name, never as "the newest".
KERNELS = {"6.1": "linux-image-amd64", "6.12": "linux-image-6.12-amd64"}

# Load order matters: busybox insmod does not resolve dependencies.
MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p", "overlay",
           "tun", "tap", "vhost_iotlb", "vhost", "vhost_net", "veth", "pktgen",
           "llc", "stp", "garp", "mrp", "8021q"]

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /lower /upper /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do insmod /modules/$m.ko || echo "guest: insmod $m failed"; done
fail() { echo "guest: $*"; echo o > /proc/sysrq-trigger; sleep 10; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288 hostroot /lower || fail "no 9p root"
mount -t tmpfs -o size=2G tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot \
    || fail "no overlay"
mkdir -p /newroot/mnt/results
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 results /newroot/mnt/results \
    || fail "no results share"
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh /mnt/results/job.sh
"""

JOB = """#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
ip link set lo up
cd {cwd}
echo "guest: $(uname -r), $(nproc) vCPUs, running: {shown}"
: > /mnt/results/started
{command} </dev/null
echo $? > /mnt/results/rc
sync
echo o > /proc/sysrq-trigger
sleep 60
"""


# asm-generic/socket.h: SO_TIMESTAMP_OLD (Python's socket module does not name it).
SO_TIMESTAMP = 29


def hold_netstamp_key():
    """Inside the guest, before any traffic: keep the kernel's netstamp_needed_key on
    for the guest's life; returns the socket that holds it.  Every ping turns
    SO_TIMESTAMP on and off, and each time the kernel patches that static branch at
    the top of __netif_receive_skb_core (net/core/dev.c, net_enable_timestamp); under
    TCG a vCPU receiving a packet during the patch can run the transient int3 and
    panic ("Oops: int3").  With one holder the only patch is this one, and pings
    only count."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
    return holder


class GuestError(Exception):
    """The guest could not be prepared, booted or did not report back."""


class GuestBootError(GuestError):
    """The guest's kernel died before the job started."""


def missing_packages():
    need = [p for p, f in PACKAGES.items() if not os.path.exists(f)]
    return need + [package for series, package in KERNELS.items() if find_kernel(series) is None]


def ensure_packages():
    """Install the test tiers' ingredients from Debian packages when missing."""
    need = missing_packages()
    if not need:
        return
    print(f"guest: installing {' '.join(need)}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *need]):
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
        if r.returncode:
            raise GuestError(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}")
    if missing_packages():
        raise GuestError(f"still missing after install: {missing_packages()}")


def find_kernel(series="6.1"):
    """(vmlinuz, module dir) of the newest installed Debian kernel of ``series`` (a key
    of KERNELS) that ships vhost_net, or None."""
    for vmlinuz in sorted(glob.glob(f"/boot/vmlinuz-{series}.*"), reverse=True):
        version = vmlinuz.split("vmlinuz-", 1)[1]
        moddir = f"/lib/modules/{version}"
        if glob.glob(f"{moddir}/kernel/drivers/vhost/vhost_net.ko*"):
            return vmlinuz, moddir
    return None


def _cpio_newc(entries):
    """An uncompressed newc cpio archive: entries of (name, mode, data, rdev)."""
    out = bytearray()

    def add(name, mode, data=b"", rdev=(0, 0), ino=[0]):
        ino[0] += 1
        namez = name.encode() + b"\0"
        fields = [ino[0], mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + namez)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for entry in entries:
        add(*entry)
    add("TRAILER!!!", 0)
    return bytes(out)


def _module(path):
    """A kernel module's bytes: busybox insmod takes them uncompressed (6.12's are .ko.xz)."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if not path.endswith(".ko"):
        raise GuestError(f"{path}: a compression this harness cannot undo")
    return data


def build_initramfs(moddir, path):
    """Write the initramfs: /init, static busybox, /dev/console and the modules in order."""
    with open("/bin/busybox", "rb") as f:
        busybox = f.read()
    entries = [("bin", stat.S_IFDIR | 0o755), ("dev", stat.S_IFDIR | 0o755),
               ("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)),
               ("modules", stat.S_IFDIR | 0o755),
               ("bin/busybox", stat.S_IFREG | 0o755, busybox),
               ("init", stat.S_IFREG | 0o755, INIT.encode())]
    order = []
    for name in MODULES:
        found = glob.glob(f"{moddir}/kernel/**/{name}.ko*", recursive=True)
        if not found:
            continue                  # built into this kernel
        entries.append((f"modules/{name}.ko", stat.S_IFREG | 0o644, _module(found[0])))
        order.append(name)
    if "vhost_net" not in order or "9p" not in order:
        raise GuestError(f"{moddir} lacks vhost_net or 9p modules (found {order})")
    entries.append(("modules/order", stat.S_IFREG | 0o644, "\n".join(order).encode()))
    with open(path, "wb") as f:
        f.write(_cpio_newc(entries))


# Boots per run() when the kernel dies before the job starts: under TCG a boot can
# hit a transient int3 of a static-key patch (seen once: enqueue_timer, 6.12, 2
# vCPUs, 1.5 s in).  Nothing of the command ran then, so booting again hides no
# failure of it; once the job has started, an end without a status is an error.
BOOT_TRIES = 2


def run(command, timeout=3000, cpus=2, memory_mb=3072, cwd=None, echo=True, kernel="6.1"):
    """Boot the guest with the Debian kernel of series ``kernel``, run ``command`` (a
    shell string) there.

    Returns (exit status, console text, {name: bytes} of the files the command
    wrote to /mnt/results).

    Raises GuestError when the guest cannot boot (BOOT_TRIES times) or does not
    report an exit status before ``timeout`` seconds: a guest that did not run is
    never a pass.
    """
    ensure_packages()
    found = find_kernel(kernel)
    if found is None:
        raise GuestError(f"no Debian {kernel} kernel with vhost_net under /boot "
                         f"(package {KERNELS[kernel]})")
    for boot in range(1, BOOT_TRIES + 1):
        try:
            return _boot(found, command, timeout, cpus, memory_mb, cwd or os.getcwd(), echo)
        except GuestBootError as e:
            if boot == BOOT_TRIES:
                raise
            print(f"guest: {e.args[0].splitlines()[0]}; booting again", flush=True)


def _boot(kernel, command, timeout, cpus, memory_mb, cwd, echo):
    """One boot of run()."""
    vmlinuz, moddir = kernel
    print(f"guest: booting {os.path.basename(vmlinuz)}, {cpus} vCPUs", flush=True)
    work = tempfile.mkdtemp(prefix="vhostpath-guest-")
    try:
        results = os.path.join(work, "results")
        os.mkdir(results)
        initrd = os.path.join(work, "initrd.cpio")
        build_initramfs(moddir, initrd)
        with open(os.path.join(results, "job.sh"), "w") as f:
            f.write(JOB.format(cwd=shlex.quote(cwd), command=command,
                               shown=command.replace('"', "'")))
        qemu = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max",
                "-m", str(memory_mb), "-smp", str(cpus), "-nographic", "-no-reboot",
                "-nic", "none", "-kernel", vmlinuz, "-initrd", initrd,
                "-append", "console=ttyS0 panic=-1 quiet loglevel=3",
                "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,"
                           "readonly=on,multidevs=remap",
                "-virtfs", f"local,path={results},mount_tag=results,security_model=none,"
                           "multidevs=remap"]
        start = time.monotonic()
        console = []
        proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            deadline = start + timeout
            for raw in proc.stdout:
                line = raw.decode(errors="replace").replace("\r", "")
                console.append(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if time.monotonic() > deadline:
                    raise GuestError(f"guest still running after {timeout} s")
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        except (GuestError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
            raise GuestError(f"guest still running after {timeout} s") from None
        elapsed = time.monotonic() - start
        rc_file = os.path.join(results, "rc")
        if not os.path.exists(rc_file):
            started = os.path.exists(os.path.join(results, "started"))
            raise (GuestError if started else GuestBootError)(
                f"the guest ended without reporting an exit status, "
                f"{'after' if started else 'before'} the job started (qemu exit "
                f"{proc.returncode}); console tail:\n" + "".join(console[-40:]))
        with open(rc_file) as f:
            rc = int(f.read().strip() or 255)
        files = {}
        for name in os.listdir(results):
            if name not in ("rc", "job.sh", "started"):
                with open(os.path.join(results, name), "rb") as f:
                    files[name] = f.read()
        print(f"guest: finished in {elapsed:.0f} s with status {rc}", flush=True)
        return rc, "".join(console), files
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    status, _, _ = run(" ".join(shlex.quote(a) for a in sys.argv[1:]) or "uname -a")
    sys.exit(status)
