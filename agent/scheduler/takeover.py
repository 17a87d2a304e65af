"""Taking over a run whose owner died: what to do with a host left STARTING.

The same applies to a scheduler with the SQLite store that restarts: it resumes
its own runs as it would take over another's (RunManager.adopt).

A host is recorded STARTING before StartJob is sent and RUNNING (with the job
id) after the worker answered. A host found STARTING was maybe sent: the
worker may be running the job, or never have received it. The new owner never
sends it again blindly. It first waits until that StartJob's deadline (the
start's time plus ``[agents] call_timeout_seconds``, the same in every
scheduler's config) is past by ``SETTLE_S``: after that the call can no longer
start a job (the agent cancels a call at its deadline, and a start it had
already accepted is listed by then). Then it asks the worker (ListJobs, this
scheduler's own jobs) for jobs of the same path and arguments started since
the start was recorded (``start_time`` of a STARTING host is when it was about
to be sent). A start the agent cancelled because the dead owner's connection
dropped mid-call counts as found: it is recorded "start failed: the start was
cancelled", yet its process may have run for a moment before the agent killed
it (seen in the tests), so it is reported as the agent recorded it (FAILED) and
never sent again.

- exactly one: that is the job; the host becomes RUNNING with its id and is
  followed to its end (never forgotten);
- none: the start never reached the worker (the agent records a job before
  it spawns it); the host is PENDING again and starts like any other (once,
  not zero times);
- more than one, or the worker cannot be asked: the host becomes UNKNOWN,
  with the reason, and is not started again (never twice).

Each host's StartJob carries a key of its own (:func:`host_key`). An agent that knows
keys lists them with its jobs, so its job is found by key alone (never "more than one");
and a start sent again with the same key (PENDING again, while a start of a frozen owner
was still on its way) answers the job of the first, so the host runs once either way.

Both schedulers must present the same client identity to the agents (the
``[agents]`` certificate), so that the jobs one started are the other's to
list, follow and stop.
"""

from __future__ import annotations

import asyncio
import time

from agent._proto import jobscheduler_pb2 as pb
from agent.client import AsyncAgentClient

__all__ = ["MATCH_SLACK_S", "NOT_RECEIVED", "SETTLE_S", "host_key", "resolve_starting"]

NOT_RECEIVED = "not received"  # resolve_starting's answer when no job matches

# Clocks of scheduler and worker differ a little: a job started this long
# before the start was recorded still matches.
MATCH_SLACK_S = 2.0
# After a StartJob's deadline, this long for a start the agent accepted to be listed.
SETTLE_S = 2.0


def host_key(run_id: str, worker_id: str) -> str:
    """The StartJob requestKey of one host of a run: an agent that knows keys answers a
    second start of it with the job of the first (agent.daemon.startkeys)."""
    return f"{run_id}/{worker_id}"


async def resolve_starting(
    client: AsyncAgentClient,
    job: pb.StartJobReq,
    sent_at: float | None,
    timeout: float,
    key: str = "",
) -> tuple[str, str]:
    """(job id, "") when the worker has exactly one matching job; ("", NOT_RECEIVED) when
    it has none; ("", why) when several match.

    With the host's ``key``: the job that carries it, exactly (an agent that knows keys
    lists them). Else jobs of the same path and arguments started since, without a key
    (a start of an older scheduler, or on an older agent): a job that carries another key
    is another host's or run's, never this one.

    Raises AgentClientError when the worker cannot be asked.
    """
    sent = sent_at or 0.0
    await asyncio.sleep(max(0.0, sent + timeout + SETTLE_S - time.time()))
    since = sent - MATCH_SLACK_S
    matches, keyed = [], []
    async for st in client.list_all(timeout=timeout):
        if key and st.request_key == key:
            keyed.append(st.job_id)
        started = st.start_time.timestamp() if st.start_time else 0.0
        same = st.path == job.path and list(st.args) == list(job.args)
        if same and started >= since and not st.request_key:
            matches.append(st.job_id)
    if keyed:
        matches = keyed
    if len(matches) == 1:
        return matches[0], ""
    if not matches:
        return "", NOT_RECEIVED
    return "", f"start maybe sent, {len(matches)} jobs match ({', '.join(matches)}): not sent again"
