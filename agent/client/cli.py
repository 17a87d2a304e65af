"""``agentctl``: drive an agent from the command line.

    agentctl [--config FILE] [--addr HOST:PORT] [--ca F --cert F --key F] COMMAND ...

    start [--wait] [--timeout S] [--env K=V]... [--limit NAME=N]... [--secret-arg I]...
          COMMAND [PATH [ARGS...]]
    stop ID | status ID [--json] | wait ID [--timeout S] | logs ID [-f] [--offset N]
    list [--state S]... [--owner NAME] [--limit N] [--json]

Connection settings come from flags, else from the [agentctl] table of the
first config file found (``--config``, ``$AGENTCTL_CONFIG``, ./agentctl.toml,
~/.config/agentctl/config.toml, /etc/worker-agent/agentctl.toml), paths in it
relative to that file. Exit status: 0 success; 1 the call failed or the job
did not succeed; 2 usage or configuration error; 3 ``wait --timeout`` ran out
while the job was still running.
"""

from __future__ import annotations

import os
import sys

# gRPC's C core logs to stderr on its own (handshake failures, ...), which is
# not agentctl's output. It reads these once, when grpc is imported: so set
# them first, unless the user asked for logs, and only if nothing imported
# grpc yet (a program importing this module keeps its own settings).
if "grpc" not in sys.modules:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    os.environ.setdefault("GRPC_TRACE", "")

# What a command does not need is not imported: --version, --help and
# completion never load grpc, protobuf or the client library; a call loads
# the synchronous client only (never asyncio's client); json, shlex, tomllib
# and pathlib only where they are used. A script looping over agentctl pays
# the interpreter and grpc, not the rest (tests/test_imports.py,
# bench/agentctlcost.py).
import argparse
import gc

from agent import __version__
from agent.vocabulary import LIMIT_NAMES, JobState

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path
    from typing import Any, NoReturn

    from agent.client.model import JobStatus
    from agent.client.sync import AgentClient

__all__ = ["connect", "console", "main", "run"]

# Where agentctl looks for its config after --config and $AGENTCTL_CONFIG.
SYSTEM_CONFIG = "/etc/worker-agent/agentctl.toml"
EXIT_WAIT_TIMEOUT = 3

_KEYS = {"addr", "ca_file", "crt_file", "key_file", "server_name", "timeout", "insecure"}


class UsageError(Exception):
    """Bad flags or client configuration (exit 2)."""


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size() finds it, without importing shutil."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size().columns  # of standard output
        except (ValueError, OSError):
            columns = 0
    return columns or 80


def _formatter(prog: str) -> argparse.HelpFormatter:
    # argparse makes a formatter for every argument added; given no width,
    # each one asks shutil (imported for it, with bz2 and lzma) for the
    # terminal's: that was half of what reading the command line cost.
    return argparse.HelpFormatter(prog, width=_columns() - 2)


class _Parser(argparse.ArgumentParser):
    """argparse's parser with :func:`_formatter` (its subcommands' parsers too)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _formatter)
        super().__init__(**kwargs)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="agentctl", description="Control a worker agent.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--config",
        help="client config file (default: $AGENTCTL_CONFIG, ./agentctl.toml, "
        f"~/.config/agentctl/config.toml, {SYSTEM_CONFIG})",
    )
    p.add_argument("--addr", help="agent address host:port")
    p.add_argument("--ca", help="CA certificate that signed the agent's certificate")
    p.add_argument("--cert", help="client certificate")
    p.add_argument("--key", help="client private key")
    p.add_argument("--server-name", help="expected name in the agent's certificate")
    p.add_argument("--call-timeout", type=float, help="deadline of each call, seconds")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    s = sub.add_parser(
        "start",
        help="start a job: COMMAND [PATH [ARGS...]]",
        usage="%(prog)s [--wait] [--timeout S] [--env K=V]... "
        "[--limit NAME=N]... [--secret-arg INDEX]... COMMAND [PATH [ARGS...]]",
        description="Start COMMAND (an alias or absolute path the agent's policy allows); "
        "PATH (a script, for an interpreter) and ARGS are optional.",
    )
    s.add_argument(
        "--wait",
        action="store_true",
        help="follow the output, then print the final state; exit 0 only if the job succeeded",
    )
    s.add_argument("--timeout", type=int, help="job timeout in seconds")
    s.add_argument("--env", action="append", default=[], metavar="K=V")
    s.add_argument(
        "--limit", action="append", default=[], metavar="NAME=N", help=", ".join(LIMIT_NAMES)
    )
    s.add_argument(
        "--secret-arg",
        action="append",
        type=int,
        default=[],
        metavar="INDEX",
        help="index into ARGS of a secret argument (never logged or stored)",
    )
    s.add_argument("command", metavar="COMMAND", help="the executable (or interpreter) to run")
    # PATH and ARGS are taken verbatim (they may start with '-'); options of
    # `start` go before COMMAND.
    rest = s.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="PATH [ARGS...]",
        help="optional: its first argument (a script, for an interpreter), then more arguments",
    )
    rest.required = False  # argparse marks REMAINDER required; it may be empty
    for name, text in (("stop", "stop a job"), ("status", "show a job's status")):
        c = sub.add_parser(name, help=text)
        c.add_argument("id")
        if name == "status":
            c.add_argument("--json", action="store_true")
    w = sub.add_parser(
        "wait",
        help="wait for a job to finish",
        description="Wait for a job to finish. Exit 0 if it succeeded, 1 if not, "
        f"{EXIT_WAIT_TIMEOUT} if --timeout ran out first (the job keeps running).",
    )
    w.add_argument("id")
    w.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
    lg = sub.add_parser("logs", help="print a job's output")
    lg.add_argument("id")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    lg.add_argument("--offset", type=int, default=0, help="start at this byte offset")
    ls = sub.add_parser("list", help="list jobs, newest first")
    ls.add_argument(
        "--state", action="append", default=[], choices=sorted(st.name for st in JobState)
    )
    ls.add_argument("--owner", default="", help="another identity's jobs (admins only)")
    ls.add_argument("--limit", type=int, default=50, help="at most this many (0: all)")
    ls.add_argument("--json", action="store_true")
    cp = sub.add_parser("completion", help="print a shell completion script")
    cp.add_argument("shell", choices=["bash"])
    return p


def _commands(p: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Each command's options (for the completion script)."""
    out: dict[str, list[str]] = {}
    for action in p._actions:  # noqa: SLF001 - argparse exposes no public walk
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sp in action.choices.items():
                out[name] = sorted(o for a in sp._actions for o in a.option_strings)  # noqa: SLF001
    out[""] = sorted(o for a in p._actions for o in a.option_strings)  # noqa: SLF001
    return out


def bash_completion(p: argparse.ArgumentParser) -> str:
    """A bash completion script for agentctl (``agentctl completion bash``)."""
    cmds = _commands(p)
    names = " ".join(sorted(k for k in cmds if k))
    cases = "\n".join(
        f'        {name}) opts="{" ".join(opts)}" ;;' for name, opts in sorted(cmds.items()) if name
    )
    states = " ".join(sorted(st.name for st in JobState))
    return f"""# bash completion for agentctl: eval "$(agentctl completion bash)"
_agentctl() {{
    local cur prev cmd i opts
    cur=${{COMP_WORDS[COMP_CWORD]}}
    prev=${{COMP_WORDS[COMP_CWORD-1]}}
    cmd=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${{COMP_WORDS[i]}} in
            {names.replace(" ", "|")}) cmd=${{COMP_WORDS[i]}}; break ;;
        esac
    done
    case $prev in
        --config|--ca|--cert|--key) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --state) COMPREPLY=($(compgen -W "{states}" -- "$cur")); return ;;
    esac
    if [ -z "$cmd" ]; then
        COMPREPLY=($(compgen -W "{names} {" ".join(cmds[""])}" -- "$cur"))
        return
    fi
    case $cmd in
{cases}
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}}
complete -o default -F _agentctl agentctl
"""


def _candidates(environ: Mapping[str, str]) -> list[str]:
    xdg = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return ["agentctl.toml", os.path.join(xdg, "agentctl", "config.toml"), SYSTEM_CONFIG]


def config_candidates(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The implicit config files, in the order they are tried."""
    from pathlib import Path

    return [Path(c) for c in _candidates(os.environ if environ is None else environ)]


def _config_path(args: argparse.Namespace) -> tuple[str | None, bool]:
    """The config file to read, and whether it was named explicitly."""
    named = args.config or os.environ.get("AGENTCTL_CONFIG")
    if named:
        return named, True
    for p in _candidates(os.environ):
        if os.path.exists(p):
            return p, False
    return None, False


def _read_table(p: str) -> dict[str, Any]:
    """The [agentctl] table of config file ``p``, its ``*_file`` paths made absolute."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    try:
        with open(p, encoding="utf-8") as f:
            raw = tomllib.loads(f.read())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{p}: {e}") from None
    table = raw.get("agentctl", {})
    if not isinstance(table, dict):
        raise UsageError(f"{p}: [agentctl] must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise UsageError(f"{p}: [agentctl] unknown key(s): {', '.join(sorted(unknown))}")
    base = os.path.dirname(os.path.realpath(p))
    data: dict[str, Any] = {}
    for k, v in table.items():
        if k.endswith("_file") and isinstance(v, str) and v:
            v = os.path.join(base, v)
        data[k] = v
    return data


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    p, explicit = _config_path(args)
    data: dict[str, Any] = {}
    if p is not None and os.path.exists(p):
        data = _read_table(p)
    elif explicit and p is not None:
        raise UsageError(f"{p}: no such file")
    for flag, key in (
        ("addr", "addr"),
        ("ca", "ca_file"),
        ("cert", "crt_file"),
        ("key", "key_file"),
        ("server_name", "server_name"),
        ("call_timeout", "timeout"),
    ):
        v = getattr(args, flag)
        if v is not None:
            data[key] = v
    data.setdefault("addr", "127.0.0.1:50000")
    return data


def connect(args: argparse.Namespace) -> AgentClient:
    """A client from flags and the config file."""
    from agent.client.model import TLSFiles
    from agent.client.sync import AgentClient

    s = _settings(args)
    timeout = float(s.get("timeout", 10.0))
    if s.get("insecure"):
        return AgentClient(s["addr"], None, insecure=True, timeout=timeout)
    if not s.get("ca_file"):
        raise UsageError("no CA certificate: pass --ca or set ca_file in agentctl.toml")
    tls = TLSFiles(
        ca=s["ca_file"],
        cert=s.get("crt_file"),
        key=s.get("key_file"),
        server_name=s.get("server_name", ""),
    )
    try:
        tls.load()
    except OSError as e:
        raise UsageError(f"cannot read certificate files: {e}") from None
    return AgentClient(s["addr"], tls, timeout=timeout)


def _kv(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise UsageError(f"--{what} expects NAME=VALUE, got {it!r}")
        out[k] = v
    return out


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def run(args: argparse.Namespace) -> int:
    """Carry out one command; raises AgentClientError/UsageError."""
    from agent.client.text import format_status, job_table, status_json

    with connect(args) as c:
        if args.cmd == "start":
            limits = {k: int(v) for k, v in _kv(args.limit, "limit").items()}
            path, job_args = (args.rest[0], args.rest[1:]) if args.rest else ("", [])
            job = c.start(
                args.command,
                path,
                args=job_args,
                env=_kv(args.env, "env"),
                timeout_seconds=args.timeout,
                limits=limits,
                secret_args=args.secret_arg,
            )
            if not args.wait:
                print(job)
                return 0
            print(f"job {job}", file=sys.stderr)
            for chunk in c.stream(job, follow=True):
                _write(chunk)
            st = c.wait(job, timeout=60)
            print(
                f"job {job}: {st.state}" + (f" ({st.error_text})" if st.error_text else ""),
                file=sys.stderr,
            )
            return 0 if st.succeeded else 1
        if args.cmd == "stop":
            c.stop(args.id)
            return 0
        if args.cmd == "status":
            st = c.query(args.id)
            print(_json(status_json(st)) if args.json else format_status(st))
            return 0
        if args.cmd == "wait":
            st = c.wait(args.id, timeout=args.timeout)
            if not st.done:
                print(
                    f"agentctl: timed out after {args.timeout:g} s: job {args.id} is still "
                    f"{st.state} (it keeps running)",
                    file=sys.stderr,
                )
                return EXIT_WAIT_TIMEOUT
            print(format_status(st))
            return 0 if st.succeeded else 1
        if args.cmd == "logs":
            for chunk in c.stream(args.id, offset=args.offset, follow=args.follow):
                _write(chunk)
            return 0
        if args.cmd == "list":
            rows: list[JobStatus] = []
            for st in c.list_all(
                states=args.state, owner=args.owner, page_size=min(args.limit or 1000, 1000)
            ):
                rows.append(st)
                if args.limit and len(rows) >= args.limit:
                    break
            if args.json:
                print(_json([status_json(s) for s in rows]))
            else:
                print(job_table(rows))
            return 0
    raise UsageError(f"unknown command {args.cmd}")  # pragma: no cover


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    return _main(argv, loaded=lambda: None)


def _main(argv: Sequence[str] | None, *, loaded: Callable[[], None]) -> int:
    """:func:`main`, calling ``loaded()`` once a call's modules are imported."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd == "completion":
        sys.stdout.write(bash_completion(parser))
        return 0
    # Only now, with a call to make, is the client library (and grpc) loaded.
    from agent.client import sync, text  # noqa: F401 - every call needs them
    from agent.client.errors import AgentClientError

    loaded()
    try:
        return run(args)
    except UsageError as e:
        print(f"agentctl: {e}", file=sys.stderr)
        return 2
    except AgentClientError as e:
        print(f"agentctl: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"agentctl: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def _collect_from_now_on() -> None:
    # Everything imported so far lives until the process ends: move it out
    # of the collector's sight, then collect only what the call makes.
    gc.freeze()
    gc.enable()


def console() -> NoReturn:
    """The ``agentctl`` command: :func:`main`, in a process that does nothing else.

    Two costs of a short process are left out. The cyclic garbage collector
    is off while grpc and protobuf are imported (they allocate much and
    free almost nothing, so collecting then is wasted work; it runs again
    for the call itself). And after the command, the interpreter's teardown
    (finalising every module and object, which costs more than the call) is
    skipped: the channel is closed and nothing is left to clean up, so once
    stdout and stderr are flushed the process ends at once.
    """
    gc.disable()
    status = _main(None, loaded=_collect_from_now_on)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            pass  # the reader went away (agentctl list | head): not an error
        except OSError:
            status = status or 1  # output was lost (a full disk): not a success
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover
    console()
