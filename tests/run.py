"""The test command: the unit and host tiers here, then the guest tier against real
/dev/vhost-net.

    sudo python3 tests/run.py             # every tier; installs the guest's Debian packages
    sudo python3 tests/run.py --host      # unit and host tiers only (no vhost-net needed)
    python3 tests/run.py --unit           # unit tier only: no root, no network

The guest tier boots Debian's kernel under QEMU (tests/guest.py) twice: once
with 2 vCPUs for test_vhost.py, once with 4 for test_vhost_mq.py (--queues up to
4).  A guest that cannot boot, a missing /dev/vhost-net, or a skipped guest test
counts as a failure.  The last line is "N passed, N failed".
"""

import argparse
import json
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT]
SUMMARY = "/mnt/results/summary.json"
BOOTS = [("test_vhost", 2), ("test_vhost_mq", 4)]     # (module, vCPUs): one guest boot each


class _Counting(unittest.TextTestResult):
    """Counts passes itself: an error in a fixture (setUpClass) is a failure that
    ran no test, so passed is not testsRun minus the problems."""

    passed = 0

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed += 1


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


def in_guest(names):
    """Inside the guest: the named vhost tests, with skips counted as failures."""
    if not os.path.exists("/dev/vhost-net"):
        passed, failed, skipped = 0, 1, 0
        print("guest: /dev/vhost-net is missing", flush=True)
    else:
        passed, failed, skipped = run_tier(None, names)
    with open(SUMMARY, "w") as f:
        json.dump({"passed": passed, "failed": failed + skipped, "skipped": skipped}, f)
    return 0 if failed + skipped == 0 else 1


def guest_tier(names):
    """One guest boot per module of BOOTS that ``names`` select; (passed, failed)."""
    from tests import guest
    passed = failed = 0
    for module, cpus in BOOTS:
        selected = [n for n in names if n.split(".")[1] == module] if names \
            else [f"tests.{module}"]
        if not selected:
            continue
        command = " ".join([sys.executable, "tests/run.py", "--in-guest", *selected])
        try:
            _, _, files = guest.run(command, cwd=ROOT, cpus=cpus)
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
    p.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("tests", nargs="*", help="dotted test names (e.g. tests.test_vhost.TestPort)")
    args = p.parse_args()
    os.chdir(ROOT)
    if args.in_guest:
        return in_guest(args.tests)
    if args.unit:
        passed, failed, skipped = run_tier("test_unit.py")
        print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
        return 0 if failed == 0 and passed > 0 else 1
    if os.geteuid() != 0:
        print("tests/run.py: run as root (tap devices, namespaces, QEMU)", file=sys.stderr)
        return 2
    from tests import guest
    try:
        guest.ensure_packages()
    except guest.GuestError as e:
        print(f"tests/run.py: {e}", file=sys.stderr)
    passed = failed = skipped = 0
    if not args.guest:
        for tier in ("test_unit", "test_host"):       # the unit tier first
            names = [t for t in args.tests if tier in t]
            if names or not args.tests:
                p_, f_, s_ = run_tier(f"{tier}.py", names)
                passed, failed, skipped = passed + p_, failed + f_, skipped + s_
    if not args.host:
        guest_names = [t for t in args.tests if "test_host" not in t and "test_unit" not in t]
        if guest_names or not args.tests:
            p_, f_ = guest_tier(guest_names)
            passed, failed = passed + p_, failed + f_
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
