"""Guest tier, second boot (4 vCPUs): --queues N over the real /dev/vhost-net."""

import unittest

from tests.cases import PersistentQueuesCase, QueuesCase, QueuesShutdownCase


class TestQueues2(QueuesCase, unittest.TestCase):
    QUEUES = 2


class TestQueues4(QueuesCase, unittest.TestCase):
    QUEUES = 4


class TestQueues2SocketNic(QueuesCase, unittest.TestCase):
    QUEUES = 2
    ARGS = ("--nic-io", "socket")


class TestQueuesShutdown(QueuesShutdownCase, unittest.TestCase):
    pass


class TestPersistentQueues(PersistentQueuesCase, unittest.TestCase):
    pass


if __name__ == "__main__":
    unittest.main()
