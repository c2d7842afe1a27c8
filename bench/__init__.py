"""Benchmarks of sdexec against systemd itself; not part of the test suite (see README.md)."""
