"""A hardened, TLS-secured worker agent for the jobscheduler protocol."""

__version__ = "0.1.0"
