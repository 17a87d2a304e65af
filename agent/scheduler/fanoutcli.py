"""The fan-out commands of ``agent-scheduler``: run --select, runs, run-show, run-follow/cancel.

Kept apart from :mod:`agent.scheduler.cli` (which parses the flags and owns
the connection) so each file stays one concern. Output lines go to stdout as
``[HOST] LINE``, so they can be piped and grepped; host state changes and the
summary go to stderr. The exit status of ``run`` and ``run-follow`` says
whether every host succeeded (0) or not (3); see the CLI's docstring.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.client import SchedulerClient
from agent.client.runs import RunHostInfo, RunInfo, RunOutputLine

__all__ = [
    "EXIT_NOT_ALL_SUCCEEDED",
    "FANOUT_COMMANDS",
    "UsageError",
    "check_single_run_flags",
    "fanout_command",
]

FANOUT_COMMANDS = frozenset({"runs", "run-show", "run-follow", "run-cancel"})
EXIT_NOT_ALL_SUCCEEDED = 3


class UsageError(Exception):
    """Bad flags or configuration (exit 2)."""


def check_single_run_flags(args: argparse.Namespace) -> None:
    """``run --worker``: refuse the flags that only mean something for a fan-out."""
    for flag in ("max_concurrency", "max_errors", "detach"):
        if getattr(args, flag, None):
            raise UsageError(f"--{flag.replace('_', '-')} is for a fan-out run (--select)")


def fanout_command(c: SchedulerClient, args: argparse.Namespace) -> int:
    """Carry out one fan-out command; returns the exit status."""
    if args.cmd == "run":
        return _run(c, args)
    if args.cmd == "runs":
        runs = c.runs(limit=args.limit)
        if args.json:
            print(json.dumps([run_json(r) for r in runs], indent=2))
        for r in [] if args.json else runs:
            print(
                f"{r.run_id}  {r.state:<11}  {_when(r)}  {r.targets:<24}  "
                f"{_counts(r)}  {r.command} {r.path}".rstrip()
            )
        return 0
    if args.cmd == "run-show":
        r = c.run_info(args.run)
        if args.json:
            print(json.dumps(run_json(r), indent=2))
        else:
            print(format_run(r))
        return 0
    if args.cmd == "run-follow":
        return _follow(c, args.run)
    if args.cmd == "run-cancel":
        r = c.cancel_run(args.run)
        print(f"run {r.run_id}: cancelling", file=sys.stderr)
        return 0
    raise UsageError(f"unknown command {args.cmd}")  # pragma: no cover


def _run(c: SchedulerClient, args: argparse.Namespace) -> int:
    if args.wait:
        raise UsageError("--wait is for --worker; a fan-out run is followed unless --detach")
    path, rest = (args.rest[0], args.rest[1:]) if args.rest else ("", [])
    if path == "--":  # "run --select S COMMAND -- ARGS" would pass the separator on
        raise UsageError("put -- before COMMAND: run --select S [FLAGS] -- COMMAND ARGS...")
    try:
        r = c.start_run(
            args.select,
            args.command,
            path,
            args=rest,
            timeout_seconds=args.timeout,
            max_concurrency=args.max_concurrency,
            max_errors=args.max_errors,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.detach:
        print(r.run_id)
        return 0
    print(
        f"run {r.run_id}: {len(r.hosts)} hosts, {r.max_concurrency} at once, "
        f"{r.max_errors} errors tolerated",
        file=sys.stderr,
    )
    return _follow(c, r.run_id)


def _follow(c: SchedulerClient, run_id: str) -> int:
    """Print a run's events until it ends; the exit status says whether all succeeded."""
    final: RunInfo | None = None
    try:
        for e in c.follow_run(run_id):
            if isinstance(e, RunOutputLine):
                sys.stdout.write(f"[{e.host}] {e.line.decode(errors='replace')}\n")
                sys.stdout.flush()
            elif isinstance(e, RunHostInfo):
                print(f"[{e.address}] {_host_state(e)}", file=sys.stderr)
            else:
                final = e
    except KeyboardInterrupt:
        print(
            f"\nrun {run_id} goes on in the scheduler: agent-scheduler run-follow {run_id}, "
            f"or run-cancel {run_id}",
            file=sys.stderr,
        )
        return 130
    if final is None:  # pragma: no cover - the stream always ends with the run
        return 1
    print(format_summary(final), file=sys.stderr)
    return 0 if final.all_succeeded else EXIT_NOT_ALL_SUCCEEDED


def _host_state(h: RunHostInfo) -> str:
    text = h.state
    if h.exit_code is not None:
        text += f" (exit {h.exit_code})"
    if h.error_text and h.state != "SUCCEEDED":
        text += f": {h.error_text}"
    return text


def _counts(r: RunInfo) -> str:
    s = r.summary
    return (
        f"ok {s['succeeded']} failed {s['failed']} not-started {s['not_started']} "
        f"unreachable {s['unreachable']}"
    )


def _when(r: RunInfo) -> str:
    return f"{r.created_at:%Y-%m-%d %H:%M:%S}" if r.created_at else "-"


def format_summary(r: RunInfo) -> str:
    """The run's summary: counts, then each host's exit code."""
    lines = [f"run {r.run_id} {r.state.lower()}: {_counts(r)}"]
    if r.summary["unknown"] or r.summary["pending"]:
        lines[0] += f" unknown {r.summary['unknown']} pending {r.summary['pending']}"
    for h in r.hosts:
        code = "-" if h.exit_code is None else str(h.exit_code)
        lines.append(f"  {h.address:<22} {h.state:<12} exit {code:<4} {h.error_text}".rstrip())
    return "\n".join(lines)


def format_run(r: RunInfo) -> str:
    """``run-show``: the run's request, then its summary and hosts."""
    args = " ".join([r.command, r.path, *r.args]).strip()
    head = [
        f"run {r.run_id} by {r.owner}, {r.state.lower()}, started {_when(r)}",
        f"  targets {r.targets}, {r.max_concurrency} at once, {r.max_errors} errors tolerated",
        f"  job {args}",
    ]
    body = [f"  {h.address:<22} {h.state:<12} job {h.job_id or '-'}" for h in r.hosts]
    return "\n".join([*head, format_summary(r), *body])


def run_json(r: RunInfo) -> dict[str, Any]:
    """A run as JSON (``--json``)."""

    def ts(t: Any) -> str | None:
        return t.isoformat() if t else None

    return {
        "run_id": r.run_id,
        "owner": r.owner,
        "state": r.state,
        "targets": r.targets,
        "command": r.command,
        "path": r.path,
        "args": list(r.args),
        "max_concurrency": r.max_concurrency,
        "max_errors": r.max_errors,
        "created_at": ts(r.created_at),
        "end_time": ts(r.end_time),
        "summary": r.summary,
        "hosts": [
            {
                "worker_id": h.worker_id,
                "address": h.address,
                "identity": h.identity,
                "state": h.state,
                "job_id": h.job_id,
                "exit_code": h.exit_code,
                "error": h.error_text,
                "start_time": ts(h.start_time),
                "end_time": ts(h.end_time),
            }
            for h in r.hosts
        ],
    }
