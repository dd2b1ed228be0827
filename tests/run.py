"""The test command: the unit and host tiers here, then the guest tier against real
/dev/vhost-net.

    sudo python3 tests/run.py             # every tier; installs the guest's Debian packages
    sudo python3 tests/run.py --host      # unit and host tiers only (no vhost-net needed)
    python3 tests/run.py --unit           # unit tier only: no root, no network

The unit and host tiers run once under each CPython from 3.6 to 3.13 found on
PATH or under pyenv's versions directory (the tool is copied onto systems with
whatever Python they have); the guest tier runs under this interpreter.

The guest tier boots Debian's kernels under QEMU (tests/guest.py) three times
(BOOTS): 6.1 with 2 vCPUs for test_vhost.py, 6.1 with 4 for test_vhost_mq.py
(--queues up to 4), and 6.12 with 2 for the core tests of test_vhost.py.  A
guest that cannot boot, a missing /dev/vhost-net, or a skipped guest test counts
as a failure.  The last line is "N passed, N failed".
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT]
SUMMARY = "/mnt/results/summary.json"
# One guest boot each: (Debian kernel series, vCPUs, module, its tests run there or
# None for all).  Debian's 6.12 runs the core tests (ping, sha256-checked transfers
# both ways with offloads on and off, either NIC I/O, the library, clean shutdown)
# and those of what only newer kernels have: UDP GSO through the tap (6.2), merged
# buffers towards the NIC (6.4: every VhostBridge there, jumbo frames included).
BOOTS = [("6.1", 2, "test_vhost", None), ("6.1", 4, "test_vhost_mq", None),
         ("6.12", 2, "test_vhost", ["TestVirtioUserPort", "TestBridgeDefaults",
                                    "TestBridgeOffloadsOff", "TestBridgeSocketNic",
                                    "TestShutdown", "TestShutdownSocketNic", "TestUdpGso",
                                    "TestLifeCycle.test_mtu_follows_the_nic", "TestTapNapi"])]


class _Counting(unittest.TextTestResult):
    """Counts passes itself: an error in a fixture (setUpClass) is a failure that
    ran no test, so passed is not testsRun minus the problems.  Each verdict comes
    with the test's duration (what the 30-minute budget is spent on)."""

    passed = 0
    _started = None                 # None outside a test (a class fixture's error)

    def startTest(self, test):
        self._started = time.monotonic()
        super().startTest(test)

    def stopTest(self, test):
        super().stopTest(test)
        self._started = None

    def _took(self):
        if self.showAll and self._started is not None:
            self.stream.write(f"[{time.monotonic() - self._started:.1f} s] ")

    def addSuccess(self, test):
        self._took()
        super().addSuccess(test)
        self.passed += 1

    def addFailure(self, test, err):
        self._took()
        super().addFailure(test, err)

    def addError(self, test, err):
        self._took()
        super().addError(test, err)


def run_tier(pattern, names=None):
    """Run one tier's modules; return (passed, failed, skipped)."""
    loader = unittest.TestLoader()
    if names:
        suite = loader.loadTestsFromNames(names)
    else:
        suite = loader.discover(HERE, pattern=pattern, top_level_dir=ROOT)
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2,
                                     resultclass=_Counting).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    return result.passed, failed, len(result.skipped)


def compile_tool():
    """vhostpath.py's bytecode for this Python, under __pycache__: the tests start the
    tool from it (topo.tool_command).  Written whatever PYTHONDONTWRITEBYTECODE says;
    in the guest, whose root is read-only, the host's is read."""
    import importlib.util
    import py_compile
    source = os.path.join(ROOT, "vhostpath.py")
    try:
        py_compile.compile(source, cfile=importlib.util.cache_from_source(source), doraise=True)
    except OSError:                         # read-only: compiled at each start instead
        pass


def pythons():
    """{(3, minor): interpreter} of the CPythons 3.6 to 3.13 on PATH or under pyenv's
    versions directory, this one first for its version."""
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [sys.executable, *(shutil.which(f"python3.{m}") for m in range(6, 14)),
                  *sorted(glob.glob(os.path.join(pyenv, "versions", "3.*", "bin", "python3")))]
    found = {}
    for exe in filter(None, candidates):
        r = subprocess.run([exe, "-c", "import platform, sys; print(platform.python_implementation(), "
                                       "*sys.version_info[:2])"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           universal_newlines=True)
        impl, *version = r.stdout.split() or ["?"]
        version = tuple(map(int, version))
        if r.returncode == 0 and impl == "CPython" and (3, 6) <= version <= (3, 13):
            found.setdefault(version, exe)
    return dict(sorted(found.items()))


def tiers_per_python(names):
    """The unit and host tiers under every Python of pythons(); (passed, failed)."""
    passed = failed = 0
    ran = []
    for version, exe in pythons().items():
        shown = ".".join(map(str, version))
        print(f"== unit and host tiers under Python {shown} ({exe})", flush=True)
        r = subprocess.run([exe, "tests/run.py", "--here", *names], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True)
        sys.stdout.write(r.stdout)
        m = re.search(r"^(\d+) passed, (\d+) failed", r.stdout, re.M)
        p_, f_ = (int(m.group(1)), int(m.group(2))) if m else (0, 1)
        if r.returncode and not f_:
            f_ = 1                                # it died before its summary
        passed, failed = passed + p_, failed + f_
        ran.append(f"{shown}: {p_} passed, {f_} failed")
    print("unit and host tiers ran under Python " + "; ".join(ran), flush=True)
    return passed, failed


def in_guest(names):
    """Inside the guest: the named vhost tests, with skips counted as failures."""
    from tests import guest
    with guest.hold_netstamp_key():
        if not os.path.exists("/dev/vhost-net"):
            passed, failed, skipped = 0, 1, 0
            print("guest: /dev/vhost-net is missing", flush=True)
        else:
            passed, failed, skipped = run_tier(None, names)
    with open(SUMMARY, "w") as f:
        json.dump({"passed": passed, "failed": failed + skipped, "skipped": skipped}, f)
    return 0 if failed + skipped == 0 else 1


def guest_tier(names, kernel=None):
    """The boots of BOOTS (those of ``kernel`` if given) with the tests ``names`` select,
    or their own; (passed, failed)."""
    from tests import guest
    passed = failed = 0
    for series, cpus, module, tests in BOOTS:
        if kernel and series != kernel or names and not kernel and series != "6.1":
            continue
        if names:
            selected = [n for n in names if n.split(".")[1] == module]
        else:
            selected = [f"tests.{module}.{t}" for t in tests] if tests else [f"tests.{module}"]
        if not selected:
            continue
        command = " ".join([sys.executable, "tests/run.py", "--in-guest", *selected])
        try:
            _, _, files = guest.run(command, cwd=ROOT, cpus=cpus, kernel=series)
        except guest.GuestError as e:
            print(f"guest tier: FAILED, the guest could not run: {e}", flush=True)
            failed += 1
            continue
        if "summary.json" not in files:
            print("guest tier: FAILED, the guest wrote no summary", flush=True)
            failed += 1
            continue
        summary = json.loads(files["summary.json"])
        if summary["skipped"]:
            print(f"guest tier: {summary['skipped']} skipped test(s) counted as failed",
                  flush=True)
        passed, failed = passed + summary["passed"], failed + summary["failed"]
    return passed, failed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unit", action="store_true", help="unit tier only")
    p.add_argument("--host", action="store_true", help="unit and host tiers only")
    p.add_argument("--guest", action="store_true", help="guest tier only")
    p.add_argument("--kernel", choices=("6.1", "6.12"),
                   help="guest tier: only the boots of this kernel (with test names: 6.1)")
    p.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--here", action="store_true", help=argparse.SUPPRESS)   # this Python only
    p.add_argument("tests", nargs="*", help="dotted test names (e.g. tests.test_vhost.TestPort)")
    args = p.parse_args()
    os.chdir(ROOT)
    compile_tool()
    if args.in_guest:
        return in_guest(args.tests)
    if args.unit:
        passed, failed, skipped = run_tier("test_unit.py")
        print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
        return 0 if failed == 0 and passed > 0 else 1
    if os.geteuid() != 0:
        print("tests/run.py: run as root (tap devices, namespaces, QEMU)", file=sys.stderr)
        return 2
    if not args.here:
        from tests import guest
        try:
            guest.ensure_packages()
        except guest.GuestError as e:
            print(f"tests/run.py: {e}", file=sys.stderr)
    passed = failed = skipped = 0
    if args.here:
        for tier in ("test_unit", "test_host"):       # the unit tier first
            names = [t for t in args.tests if tier in t]
            if names or not args.tests:
                p_, f_, s_ = run_tier(f"{tier}.py", names)
                passed, failed, skipped = passed + p_, failed + f_, skipped + s_
        print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
        return 0 if failed == 0 and passed > 0 else 1
    if not args.guest:
        names = [t for t in args.tests if "test_host" in t or "test_unit" in t]
        if names or not args.tests:
            passed, failed = tiers_per_python(names)
    if not args.host:
        guest_names = [t for t in args.tests if "test_host" not in t and "test_unit" not in t]
        if guest_names or not args.tests:
            p_, f_ = guest_tier(guest_names, args.kernel)
            passed, failed = passed + p_, failed + f_
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
