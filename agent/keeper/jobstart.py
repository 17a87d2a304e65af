"""A start request, from the plan's check to the spawner's answer.

The plan is checked (its schema, the rlimits the kernel would refuse, capabilities only
from a root spawner), the job's place is made (:mod:`agent.keeper.jobplace`), its
process started (:mod:`agent.keeper.childexec`: at once on the C vfork path, through the
error pipe on the fork path), and the answer is ``{"op": "spawned", "id": ..., "pid":
PID}`` or ``{..., "error": TEXT, "errno": N}``. A start that fails after its place was
made leaves nothing: the child (exited 127) is reaped and the place undone.

Standard library only besides the spawner's own modules: the spawner never imports grpc.
"""

from __future__ import annotations

import errno
import os
import selectors
from collections.abc import Callable
from typing import Any

from agent.keeper import cgroups
from agent.keeper import spawnproto as proto
from agent.keeper.childexec import Launcher, Starting, report_error
from agent.keeper.childsetup import CAP_SYS_RESOURCE, check_limits, has_cap, nr_open
from agent.keeper.jobplace import JobPlaces, Place, PlaceError
from agent.keeper.spawnplan import check_plan

# The spawner's bookkeeping of a job whose program runs: (pid, request id, its leaf,
# its scratch directory, its listen() listener or -1, its plan).
Started = Callable[[int, Any, cgroups.JobCgroup | None, str | None, int, dict[str, Any]], None]


class Starter:
    """Carries out the spawner's start requests."""

    def __init__(
        self,
        places: JobPlaces,
        launcher: Launcher,
        sel: selectors.BaseSelector,
        send: Callable[[dict[str, Any]], None],
        started: Started,
    ) -> None:
        self.places, self.launcher, self.sel = places, launcher, sel
        self.send = send  # the spawner's answer to its agent
        self.started = started
        self.privileged = has_cap(CAP_SYS_RESOURCE)
        self.nr_open = nr_open()

    def refuse(self, rid: Any, error: str, code: int) -> None:
        """Answer a start that made no job."""
        self.send({"op": "spawned", "id": rid, "error": error, "errno": code})

    def check(self, plan: Any, fds: dict[str, int]) -> str:
        """Why this plan cannot be started ("" if it can be tried)."""
        err = check_plan(plan, fds)  # the one schema (agent.keeper.spawnplan)
        if not err:
            assert isinstance(plan, dict)
            err = check_limits(
                plan.get("limits", {}), privileged=self.privileged, nr_open=self.nr_open
            )
        if (
            not err
            and isinstance(plan, dict)
            and plan.get("capabilities")
            and not self.launcher.root
        ):
            err = "capabilities: the job spawner does not run as root"
        return err

    def spawn(self, msg: dict[str, Any], fds: dict[str, int]) -> None:
        """Start the job of a "spawn" request (``fds``: its descriptors by role)."""
        rid, plan = msg.get("id"), msg.get("plan")
        err = self.check(plan, fds)
        if err or not isinstance(plan, dict):
            self.refuse(rid, err, errno.EINVAL)
            return
        # The cgroup leaf, the confinement prepared, the scratch directory: before the fork.
        try:
            place = self.places.prepare(plan, fds)
        except PlaceError as e:
            self.refuse(rid, e.text, e.code)
            return
        if self.launcher.module is not None:
            self.spawn_vfork(rid, plan, fds, place)
            return
        try:
            st = self.launcher.fork(rid, plan, fds, place)
        except OSError as e:
            self.places.release(place.cg, place.scratch)
            code = e.errno or errno.EIO
            self.refuse(rid, proto.error_text("fork", code), code)
            return
        # Not waited for here: the answer goes out when the error pipe reaches
        # end of file (exec done) or carries a report, so the next job can be
        # forked while this one is still setting up.
        self.sel.register(st.fd, selectors.EVENT_READ, st)

    def spawn_vfork(
        self, rid: Any, plan: dict[str, Any], fds: dict[str, int], place: Place
    ) -> None:
        """The C path: the spawner sleeps until the child has exec'd or failed, so the
        answer goes out at once (no error pipe, no Starting)."""
        pid, error, code, listener = self.launcher.vfork(plan, fds, place)
        if error:
            self.start_failed(pid, rid, place.cg, place.scratch, error, code)
            return
        self.started(pid, rid, place.cg, place.scratch, listener, plan)

    def on_started(self, st: Starting) -> None:
        """The fork path's error pipe is readable: more of a report, or its end."""
        try:
            chunk = os.read(st.fd, 512)
        except InterruptedError:
            return
        if chunk:
            st.report += chunk
            return
        self.sel.unregister(st.fd)
        os.close(st.fd)
        listener = st.take_listener()
        if st.report:
            error, num = report_error(st.report)
            self.start_failed(st.pid, st.rid, st.cg, st.scratch, error, num)
            return
        self.started(st.pid, st.rid, st.cg, st.scratch, listener, st.plan)

    def start_failed(
        self,
        pid: int,
        rid: Any,
        cg: cgroups.JobCgroup | None,
        scratch: str | None,
        error: str,
        code: int,
    ) -> None:
        """A child that could not exec (or none at all, pid 0): reap it, undo its box, say why."""
        if pid:
            os.waitpid(pid, 0)  # it has exited 127
        self.places.release(cg, scratch)
        self.refuse(rid, error, code)
