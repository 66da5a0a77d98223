"""Verdict policy: pure decision logic over register records (no I/O, no clock)."""
