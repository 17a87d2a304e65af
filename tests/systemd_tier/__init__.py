"""Tests that need a real systemd: booted in a systemd-nspawn container (see README.md)."""
