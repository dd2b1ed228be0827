"""vhostpath tests: run them with tests/run.py (see README)."""
