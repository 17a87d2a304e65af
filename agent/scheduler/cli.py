"""``agent-scheduler``: run the reference scheduler, or use it.

    agent-scheduler serve --config scheduler.toml
    agent-scheduler [CONNECTION] workers [--json]
    agent-scheduler [CONNECTION] run --worker ID [--wait] [--timeout S] COMMAND [PATH [ARGS...]]
    agent-scheduler [CONNECTION] status --worker ID JOB
    agent-scheduler [CONNECTION] stop --worker ID JOB

Fan-out runs (one job on many workers, docs/fleet.md):

    agent-scheduler [CONNECTION] run --select SELECTOR [--max-concurrency N|P%]
                    [--max-errors N|P%] [--timeout S] [--detach] -- COMMAND [PATH [ARGS...]]
    agent-scheduler [CONNECTION] runs [--limit N] [--json]
    agent-scheduler [CONNECTION] run-show RUN [--json]
    agent-scheduler [CONNECTION] run-follow RUN
    agent-scheduler [CONNECTION] run-cancel RUN

SELECTOR: label:K=V[,K=V...] | id:IDENTITY-GLOB | list:ID-OR-ADDRESS[,...].
``run --select`` and ``run-follow`` print every output line as ``[HOST] LINE``
on stdout, host state changes and the summary on stderr.

CONNECTION: --addr HOST:PORT --ca F --cert F --key F (a user identity the
scheduler's [auth] users lists), or --client-config FILE with a [client]
table of the same keys (addr, ca_file, crt_file, key_file). Exit status: 0
success (for a fan-out: every host succeeded); 1 refused or failed (or, with
--wait, the job did not succeed); 2 usage or configuration error; 3 a
fan-out ended with a host that did not succeed (failed, unreachable, not
started or unknown; ``run`` and ``run-follow``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from agent import __version__, tls
from agent.client import AgentClientError, SchedulerClient, TLSFiles
from agent.client.text import format_status, status_json
from agent.configfile import ConfigError
from agent.scheduler.config import load_config
from agent.scheduler.fanoutcli import (
    FANOUT_COMMANDS,
    UsageError,
    check_single_run_flags,
    fanout_command,
)
from agent.scheduler.server import serve
from agent.scheduler.store import StoreError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agent-scheduler", description="The reference scheduler of worker agents."
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--client-config", help="file with a [client] table (addr, ca_file, crt_file, key_file)"
    )
    p.add_argument("--addr", help="scheduler address (default 127.0.0.1:50001)")
    p.add_argument("--ca")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--call-timeout", type=float, default=10.0)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the scheduler service")
    s.add_argument(
        "-c", "--config", default=os.environ.get("AGENT_SCHEDULER_CONFIG", "scheduler.toml")
    )
    w = sub.add_parser("workers", help="list registered workers")
    w.add_argument("--json", action="store_true")
    r = sub.add_parser("run", help="start a job on a worker, or on many (--select)")
    where = r.add_mutually_exclusive_group(required=True)
    where.add_argument("--worker", help="one worker's id")
    where.add_argument("--select", help="label:K=V,... | id:GLOB | list:A,B (a fan-out run)")
    r.add_argument("--wait", action="store_true", help="(--worker) wait for the job's end")
    r.add_argument("--max-concurrency", help="(--select) hosts at once: N or P%% (default all)")
    r.add_argument("--max-errors", help="(--select) errors tolerated: N or P%% (default 0)")
    r.add_argument("--detach", action="store_true", help="(--select) print the run id, exit")
    r.add_argument("--timeout", type=int, help="job timeout in seconds")
    r.add_argument("command")
    r.add_argument("rest", nargs=argparse.REMAINDER, metavar="PATH [ARGS...]")
    rs = sub.add_parser("runs", help="list fan-out runs, newest first")
    rs.add_argument("--limit", type=int, default=0)
    rs.add_argument("--json", action="store_true")
    show = sub.add_parser("run-show", help="show one fan-out run")
    show.add_argument("run")
    show.add_argument("--json", action="store_true")
    for name, text in (("run-follow", "follow a fan-out run"), ("run-cancel", "cancel one")):
        sub.add_parser(name, help=text).add_argument("run")
    for name in ("status", "stop"):
        c = sub.add_parser(name, help=f"{name} a job on a worker")
        c.add_argument("--worker", required=True)
        c.add_argument("job")
        if name == "status":
            c.add_argument("--json", action="store_true")
    return p


def _serve(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
        s = cfg.server
        assert s.crt_file and s.key_file and s.ca_file
        try:
            tls.load_key_pair(s.crt_file, s.key_file)
            tls.load_ca(s.ca_file)
            a = cfg.agents
            assert a.crt_file and a.key_file and a.ca_file
            tls.load_key_pair(a.crt_file, a.key_file)
        except tls.TLSConfigError as e:
            raise ConfigError(cfg.path, "server", "crt_file", str(e)) from None
    except ConfigError as e:
        print(f"agent-scheduler: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(cfg))
    except (RuntimeError, StoreError) as e:
        logging.getLogger("agent.scheduler").error("%s", e)
        return 1
    return 0


def _connect(args: argparse.Namespace) -> SchedulerClient:
    data: dict[str, Any] = {}
    if args.client_config:
        p = Path(args.client_config)
        try:
            table = tomllib.loads(p.read_text(encoding="utf-8")).get("client", {})
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"{p}: {e}") from None
        base = p.resolve().parent
        for k, v in table.items():
            data[k] = str(base / v) if k.endswith("_file") and v else v
    for flag, key in (
        ("addr", "addr"),
        ("ca", "ca_file"),
        ("cert", "crt_file"),
        ("key", "key_file"),
    ):
        if getattr(args, flag):
            data[key] = getattr(args, flag)
    if not data.get("ca_file"):
        raise UsageError("no CA certificate: pass --ca or --client-config")
    tls = TLSFiles(ca=data["ca_file"], cert=data.get("crt_file"), key=data.get("key_file"))
    try:
        tls.load()
    except OSError as e:
        raise UsageError(f"cannot read certificate files: {e}") from None
    return SchedulerClient(data.get("addr", "127.0.0.1:50001"), tls, timeout=args.call_timeout)


def _use(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        if args.cmd == "workers":
            ws = c.workers()
            if args.json:
                print(
                    json.dumps(
                        [
                            {
                                "worker_id": w.worker_id,
                                "address": w.address,
                                "identity": w.identity,
                                "last_seen": w.last_seen.isoformat() if w.last_seen else None,
                                "labels": w.labels,
                            }
                            for w in ws
                        ],
                        indent=2,
                    )
                )
            else:
                for w in ws:
                    seen = f"{w.last_seen:%H:%M:%S}" if w.last_seen else "-"
                    labels = ",".join(f"{k}={v}" for k, v in sorted(w.labels.items()))
                    print(
                        f"{w.worker_id}  {w.address:<22}  {w.identity:<16}  last seen {seen}"
                        f"  {labels}".rstrip()
                    )
            return 0
        if args.cmd in FANOUT_COMMANDS or (args.cmd == "run" and args.select):
            return fanout_command(c, args)
        if args.cmd == "run":
            check_single_run_flags(args)
            path, rest = (args.rest[0], args.rest[1:]) if args.rest else ("", [])
            job = c.start(args.worker, args.command, path, args=rest, timeout_seconds=args.timeout)
            print(job)
            if not args.wait:
                return 0
            st = c.wait(args.worker, job, timeout=3600)
            print(format_status(st), file=sys.stderr)
            return 0 if st.succeeded else 1
        if args.cmd == "status":
            st = c.query(args.worker, args.job)
            if args.json:
                print(json.dumps(status_json(st), indent=2))
            else:
                print(format_status(st))
            return 0
        if args.cmd == "stop":
            c.stop(args.worker, args.job)
            return 0
    raise UsageError(f"unknown command {args.cmd}")  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.cmd == "serve":
        return _serve(args)
    try:
        return _use(args)
    except UsageError as e:
        print(f"agent-scheduler: {e}", file=sys.stderr)
        return 2
    except AgentClientError as e:
        print(f"agent-scheduler: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
