"""Test helpers for running a fleet of hosts on one machine (network namespaces)."""
