#!/usr/bin/env python3
"""A stand-in for the agent daemon, to prove systemd/worker-agent.service under a real systemd.

Standard library only.  Started as ``agent run --config FILE`` it behaves like
the real agent towards systemd (Type=notify):

* binds ``[grpc_server] addr`` of the TOML config, waits ``[standin] ready_delay``
  seconds, then sends ``READY=1`` (so a test can see the unit stay
  ``activating`` until then);
* sends ``WATCHDOG=1`` every half ``$WATCHDOG_USEC``;
* on SIGHUP sends ``RELOADING=1`` + ``MONOTONIC_USEC``, re-reads the config,
  then ``READY=1``; ``agent reload --config FILE --pid PID`` (the unit's
  ExecReload=) only sends that SIGHUP;
* on SIGTERM sends ``STOPPING=1``, sends TERM to each child's process group,
  KILL after ``[standin] stop_grace`` seconds, and exits 0.

Instead of gRPC it answers one JSON request per TCP connection (a line in, a
line out), so that a test can make it spawn children inside the sandbox:

    {"op": "status"}
    {"op": "spawn", "argv": [...], "timeout": 30}  -> rc, stdout, stderr (waits)
    {"op": "spawn_bg", "argv": [...]}              -> pid (own process group)
    {"op": "kill", "pid": N, "signal": 15}         -> killpg, then the exit status
    {"op": "exit", "code": N}                      -> exits at once with that status

It runs whatever argv it is sent: only ever bind it to loopback in a test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import tomllib

STATE_DIR = os.environ.get("STATE_DIRECTORY", "/var/lib/worker-agent").split(":")[0]
JOB_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": STATE_DIR}


def sd_notify(message: str) -> bool:
    """Send one sd_notify datagram; return False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode(), address)
    return True


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd's *TimestampMonotonic use."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class StandIn:
    """The daemon: config, listening socket, children, and the signal-driven main loop."""

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self.config = self._load()
        self.reloads = 0
        self.ready_usec = 0
        self.reload_usec: list[int] = []
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.lock = threading.Lock()
        self.pending: list[signal.Signals] = []

    def _load(self) -> dict[str, Any]:
        with open(self.config_path, "rb") as fh:
            return tomllib.load(fh)

    def _handle_signal(self, signum: int, _frame: object) -> None:
        self.pending.append(signal.Signals(signum))

    def serve(self) -> int:
        """Run until SIGTERM; return the exit status."""
        # SIGUSR2: the keeper unit's reload (`kill -USR2`, a re-exec in the real keeper).
        for signum in (signal.SIGHUP, signal.SIGUSR2, signal.SIGTERM):
            signal.signal(signum, self._handle_signal)
        host, _, port = self.config["grpc_server"]["addr"].rpartition(":")
        listener = socket.create_server((host, int(port)), reuse_port=False)
        listener.settimeout(0.1)
        standin = self.config.get("standin", {})
        time.sleep(float(standin.get("ready_delay", 0)))
        self.ready_usec = monotonic_usec()
        sd_notify(f"READY=1\nSTATUS=listening on {host}:{port}")
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        next_ping = time.monotonic()
        while True:
            while self.pending:
                signum = self.pending.pop(0)
                if signum in (signal.SIGHUP, signal.SIGUSR2):
                    self._reload()
                elif signum == signal.SIGTERM:
                    return self._shutdown(float(standin.get("stop_grace", 5)))
            if watchdog_usec and time.monotonic() >= next_ping:
                sd_notify("WATCHDOG=1")
                next_ping = time.monotonic() + watchdog_usec / 2e6
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _reload(self) -> None:
        now = monotonic_usec()
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS=reloading")
        self.config = self._load()
        self.reloads += 1
        self.reload_usec.append(now)
        sd_notify(f"READY=1\nSTATUS=reloaded {self.reloads} time(s)")

    def _shutdown(self, grace: float) -> int:
        sd_notify("STOPPING=1\nSTATUS=stopping jobs")
        with self.lock:
            children = list(self.children.values())
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in children:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        return 0

    def _answer(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            try:
                request = json.loads(stream.readline())
                reply = self._dispatch(request)
            except (OSError, ValueError, KeyError, TypeError, subprocess.SubprocessError) as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            stream.write(json.dumps(reply).encode() + b"\n")
            stream.flush()

    def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "status":
            return {
                "pid": os.getpid(),
                "uid": os.getuid(),
                "gid": os.getgid(),
                "reloads": self.reloads,
                "ready_usec": self.ready_usec,
                "reload_usec": self.reload_usec,
                "watchdog_usec": os.environ.get("WATCHDOG_USEC"),
                "state_directory": os.environ.get("STATE_DIRECTORY"),
                "logs_directory": os.environ.get("LOGS_DIRECTORY"),
                "configuration_directory": os.environ.get("CONFIGURATION_DIRECTORY"),
            }
        if op == "spawn":
            scratch = os.path.join(STATE_DIR, "scratch", uuid.uuid4().hex)
            os.makedirs(scratch, mode=0o700)
            proc = subprocess.run(
                request["argv"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                cwd=scratch,
                env={**JOB_ENV, "SCRATCH": scratch},
                start_new_session=True,
                close_fds=True,
                timeout=float(request.get("timeout", 30)),
                check=False,
            )
            return {
                "rc": proc.returncode,
                "stdout": proc.stdout.decode(errors="replace"),
                "stderr": proc.stderr.decode(errors="replace"),
                "scratch": scratch,
            }
        if op == "spawn_bg":
            child = subprocess.Popen(
                request["argv"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=JOB_ENV,
                start_new_session=True,
                close_fds=True,
            )
            with self.lock:
                self.children[child.pid] = child
            return {"pid": child.pid, "pgid": os.getpgid(child.pid)}
        if op == "kill":
            with self.lock:
                child = self.children.pop(int(request["pid"]))
            os.killpg(child.pid, int(request.get("signal", signal.SIGTERM)))
            return {"returncode": child.wait(timeout=10)}
        if op == "exit":
            os._exit(int(request["code"]))
        raise ValueError(f"unknown op {op!r}")


def main(argv: list[str]) -> int:
    """Entry point: ``agent run --config FILE`` or ``agent keeper --config FILE`` (the
    keeper unit's; the same stand-in), its ExecStopPost= ``agent keeper --after-stop``,
    or the agent unit's ExecReload=
    ``agent reload --config FILE --pid PID`` (here: only the SIGHUP)."""
    if len(argv) == 5 and argv[0] == "reload" and argv[1] == "--config" and argv[3] == "--pid":
        os.kill(int(argv[4]), signal.SIGHUP)
        return 0
    if argv == ["keeper", "--after-stop"]:
        # The keeper unit's ExecStopPost= (the real one kills the job cgroups a stopped
        # keeper left); the stand-in stops what it spawned itself.
        return 0
    if len(argv) != 3 or argv[0] not in ("run", "keeper") or argv[1] != "--config":
        print(
            "usage: agent (run | keeper) --config FILE | agent keeper --after-stop"
            " | agent reload --config FILE --pid PID",
            file=sys.stderr,
        )
        return 2
    return StandIn(argv[2]).serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
