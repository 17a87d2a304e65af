"""The ``agent`` command: ``agent run``, ``check-config``, ``reload`` and ``pki``.

One of the two places that end the process (with the client CLI). Exit
status: 0 success, 1 runtime failure, 2 invalid configuration or usage.
Nothing that imports grpc is imported before the cipher policy is set (see
``agent.tls``), and nothing gRPC is created before the daemon fork.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agent import __version__
from agent.configfile import ConfigError
from agent.daemon import pki, startup
from agent.daemon.grpc_gate import GateError, open_gate
from agent.keeper.config import Config, load

log = logging.getLogger("agent")

DEFAULT_CONFIG = os.environ.get("AGENT_CONFIG", "config.toml")
# Below the units' TimeoutStartSec= (60 s), which also bounds ExecReload=: the
# operator gets this command's reason rather than systemd's timeout.
RELOAD_TIMEOUT = 45.0


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    try:
        return (os.get_terminal_size(stdout.fileno()).columns if stdout else 0) or 80
    except (ValueError, OSError):
        return 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter with the width computed here.

    Without a width, argparse imports shutil (and with it zlib, bz2 and lzma,
    about 0.3 MB resident) in every add_argument, to size help it then never
    prints: the agent would carry them for its whole life.
    """

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24) -> None:
        super().__init__(prog, indent_increment, max_help_position, _terminal_columns() - 2)


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose sub-parsers (of its class) use :class:`_HelpFormatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="agent", description="The worker agent.")
    p.add_argument("--version", action="version", version=f"agent {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the agent (foreground unless --daemon)")
    r.add_argument(
        "-c",
        "--config",
        default=DEFAULT_CONFIG,
        help=f"config file (default: {DEFAULT_CONFIG}; env AGENT_CONFIG)",
    )
    r.add_argument(
        "--daemon",
        action="store_true",
        help="detach and run in the background (pid file, log file)",
    )
    c = sub.add_parser("check-config", help="validate the configuration and exit")
    c.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    rl = sub.add_parser(
        "reload",
        help="make the running agent reload (SIGHUP) and wait: exit 1 if it rejected anything",
        description=(
            "Send SIGHUP to the agent of this configuration and wait until it has reloaded "
            "its certificates, CRLs, policy, [auth] and audit log. Exit 0 if it accepted "
            "everything, 1 if it rejected something (it then carries on with the previous "
            "version), did not answer in time, or is not running. The units' ExecReload=."
        ),
    )
    rl.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    rl.add_argument(
        "--pid",
        type=int,
        help="the agent's pid (default: the one holding the state directory's lock)",
    )
    rl.add_argument(
        "--timeout",
        type=float,
        default=RELOAD_TIMEOUT,
        help=f"seconds to wait for the agent's answer (default {RELOAD_TIMEOUT:g})",
    )
    k = sub.add_parser(
        "keeper",
        help='run the job keeper as a service of its own ([keeper] mode = "service")',
        description=(
            "Run the job keeper, the process that holds the jobs, on its own: the agent "
            '(with [keeper] mode = "service") attaches to it, and stopping or restarting '
            "the agent leaves every job running. SIGTERM or Ctrl-C stops its jobs (their "
            "grace, then their cgroup) and ends it; SIGUSR2 re-executes its code in place "
            "(an upgrade), keeping every job. The unit worker-agent-keeper.service runs it."
        ),
    )
    k.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    k.add_argument(
        "--after-stop",
        action="store_true",
        help=(
            "the unit's ExecStopPost=: kill the job cgroups the keeper left, unless it "
            "crashed ($SERVICE_RESULT), when they are left for the next keeper to adopt"
        ),
    )
    # Only the parser: cryptography is imported when a pki command runs.
    pki.add_parser(sub)
    return p


# syslog priorities (RFC 5424) of the logging levels, for journald's "<N>" prefix.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def stderr_is_journal(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True when ``fd`` is the journal stream systemd gave us (``JOURNAL_STREAM``).

    The variable holds ``device:inode`` of the stream; comparing it with the
    descriptor tells apart a child whose stderr was redirected elsewhere.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


class JournalFormatter(logging.Formatter):
    """Prefixes every line with ``<priority>`` so journald records its level."""

    def format(self, record: logging.LogRecord) -> str:
        """The wrapped format, one prefix per line (tracebacks included)."""
        prio = _PRIORITY.get(record.levelno, 3 if record.levelno > logging.WARNING else 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, pid (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        obj: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


class JournalJsonFormatter(JsonFormatter):
    """A JSON line with journald's priority prefix."""

    def format(self, record: logging.LogRecord) -> str:
        """``<priority>`` + the JSON line."""
        return f"<{_PRIORITY.get(record.levelno, 3)}>{super().format(record)}"


def setup_logging(cfg: Config, *, daemon: bool) -> None:
    """Operational log: stderr, a file, or syslog, as configured."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    level = getattr(logging, cfg.logging.level.upper())
    as_json = cfg.logging.format == "json"
    handler: logging.Handler
    journal = False
    # logging.handlers only for the two handlers that need it: it brings
    # pickle, queue and copy (about 0.4 MB resident) into an agent on stderr.
    if cfg.logging.syslog:
        from logging.handlers import SysLogHandler

        handler = SysLogHandler(address=str(cfg.logging.syslog_socket))
        fmt = "agent[%(process)d]: %(levelname)s %(name)s: %(message)s"
    elif cfg.logging.file is not None or daemon:
        path = cfg.logging.file or cfg.jobs.state_dir / "agent.log"
        from logging.handlers import WatchedFileHandler

        handler = WatchedFileHandler(path)
        fmt = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        journal = stderr_is_journal()
        # Under systemd the journal adds the time itself.
        fmt = (
            "%(levelname)s %(name)s: %(message)s"
            if journal or os.environ.get("INVOCATION_ID")
            else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    formatter: logging.Formatter
    if as_json and not cfg.logging.syslog:
        formatter = JournalJsonFormatter() if journal else JsonFormatter()
    elif journal:
        formatter = JournalFormatter(fmt)
    else:
        formatter = logging.Formatter(fmt)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level)


# glibc's M_ARENA_MAX (malloc.h); 2: the main arena and one for every other thread.
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas(environ: Mapping[str, str] | None = None) -> bool:
    """At most :data:`MALLOC_ARENAS` glibc malloc arenas in this process; True if set.

    gRPC's event-engine threads would each get an arena of their own (up to
    8 per core), and memory freed in one is kept there: about 0.6 MB more
    resident after a burst of jobs, for no measurable CPU. mallopt() applies
    wherever the agent starts (systemd, ``--daemon``: the fork keeps it) and,
    unlike the MALLOC_ARENA_MAX variable, reaches no job. An operator's
    MALLOC_ARENA_MAX wins; without glibc this does nothing.
    """
    if "MALLOC_ARENA_MAX" in (os.environ if environ is None else environ):
        return False
    import ctypes  # already loaded (landlock), so no cost

    try:
        return bool(ctypes.CDLL(None).mallopt(_M_ARENA_MAX, MALLOC_ARENAS))
    except (OSError, AttributeError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.cmd == "pki":
        return _pki(args)
    if args.cmd == "reload":
        return _reload(args)
    if args.cmd == "keeper":
        return _keeper(args)
    try:
        cfg = load(args.config)
        prepared = startup.prepare(cfg, create_dirs=args.cmd == "run")
    except ConfigError as e:
        print(f"agent: {e}", file=sys.stderr)
        return 2
    if args.cmd == "check-config":
        for w in prepared.warnings:
            print(f"agent: warning: {w}", file=sys.stderr)
        gs = cfg.grpc_server
        mode = "mTLS" if cfg.mtls else "TLS" if gs.use_tls else "PLAINTEXT"
        print(
            f"agent: {cfg.path}: ok ({mode} "
            f"on {gs.addr}; {len(prepared.policy.entries)} policy entries; jobs run as "
            f"{prepared.job_user.name})"
        )
        return 0
    # Nothing above this line imports grpc (tests/test_imports.py checks it).
    limit_malloc_arenas()
    try:
        open_gate(
            key_type=prepared.server_pair.key_type
            if cfg.grpc_server.use_tls and prepared.server_pair is not None
            else None,
            tls13_only=cfg.grpc_server.tls13_only,
        )
    except GateError as e:
        print(f"agent: internal error: {e}", file=sys.stderr)
        return 1
    if args.daemon:
        from agent.daemon.daemonize import daemonize

        def in_daemon(report: Callable[[str], None]) -> int:
            setup_logging(cfg, daemon=True)
            from agent.daemon.server import run

            return run(
                prepared,
                on_ready=lambda: report(f"ready pid {os.getpid()}"),
                on_startup_error=lambda e: report(f"error: {e}"),
            )

        return daemonize(cfg, in_daemon)
    setup_logging(cfg, daemon=False)
    from agent.daemon.server import run

    return run(prepared)


def _keeper(args: argparse.Namespace) -> int:
    """``agent keeper``: set up, then become the job keeper (it returns only on failure)."""
    if args.after_stop:
        from agent.keeper import keeperservice

        return keeperservice.after_stop(os.environ)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"agent keeper: {e}", file=sys.stderr)
        return 2
    from agent.keeper import keeperservice

    return keeperservice.main(cfg)


def _reload(args: argparse.Namespace) -> int:
    """``agent reload``: SIGHUP the agent, wait for its outcome, say it; 0 only if all accepted."""
    from agent.daemon import reloadstatus

    if args.timeout <= 0:
        print("agent reload: --timeout must be positive", file=sys.stderr)
        return 2
    try:
        cfg = load(args.config)
    except ConfigError as e:
        if args.pid is None:
            print(f"agent reload: {e}", file=sys.stderr)
            return 2
        # The agent rejects this file the same way (same loader): let it log that and
        # show it in its status line, and fail the reload now (its state directory,
        # where it records the outcome, is named in the very file that is broken).
        with contextlib.suppress(OSError):
            os.kill(args.pid, signal.SIGHUP)
        print(
            f"agent reload: rejected: config: {e} (the agent keeps its current "
            "configuration and policy)",
            file=sys.stderr,
        )
        return 1
    state_dir = cfg.jobs.state_dir
    try:
        pid = args.pid if args.pid is not None else reloadstatus.agent_pid(state_dir)
        outcome = reloadstatus.request(state_dir, pid, timeout=args.timeout)
    except reloadstatus.ReloadError as e:
        print(f"agent reload: {e}", file=sys.stderr)
        return 1
    for what, why in outcome.rejected:
        print(f"agent reload: rejected: {what}: {why}", file=sys.stderr)
    if not outcome.ok:
        print(
            f"agent reload: the agent (pid {pid}) carries on with the previous version of "
            "what it rejected",
            file=sys.stderr,
        )
        return 1
    print(f"agent reload: the agent (pid {pid}) reloaded")
    return 0


def _pki(args: argparse.Namespace) -> int:
    try:
        written = pki.run(args)
    except pki.PKIError as e:
        print(f"agent pki: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
