"""Every wire-level check of a request, before any work is done.

Bounds on every string and repeated field, well-formed ids, states, page
tokens and offsets: a caller's malformed input is INVALID_ARGUMENT here,
never UNKNOWN or INTERNAL later, and never costs more than a bounded scan.
Policy decisions (what may run) are :mod:`agent.keeper.policy`'s; this
module only says whether a request is well-formed.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from agent.keeper.errors import InvalidArgument
from agent.vocabulary import JobState


class StartFields(Protocol):
    """The fields of a start request that are checked here."""

    @property
    def command(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def args(self) -> Sequence[str]: ...
    @property
    def env(self) -> Mapping[str, str]: ...


# Hard caps on a request, whatever the policy says. They keep a hostile
# caller from making the agent do unbounded work before any policy rule runs.
MAX_PATH_BYTES = 4096
MAX_ARGS = 1024
MAX_ARG_BYTES = 128 * 1024
MAX_ENV = 64
MAX_ENV_VALUE_BYTES = 32 * 1024
MAX_SECRET_ARGS = MAX_ARGS
# All arguments and environment values together: the kernel's own limit
# for argv plus environ is a quarter of the stack limit (2 MiB with the
# usual 8 MiB), so nothing larger could be executed anyway.
MAX_EXEC_BYTES = 1024 * 1024
MAX_ENV_NAME_BYTES = 256
# ListJobs: there are fewer job states than this, so more is a malformed
# request, not a query (each would become an SQL parameter).
MAX_STATES = 16
MAX_OWNER_BYTES = 1024
MAX_PAGE_TOKEN_CHARS = 64
# \Z, not $: '$' also matches before a trailing newline ("FOO\n").
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


def text_problem(value: str, what: str, max_bytes: int) -> str | None:
    """Why a command/path string is malformed, or None."""
    if value == "":
        return f"{what} is empty"
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        return f"{what} is longer than {max_bytes} bytes"
    if "\x00" in value:
        return f"{what} contains a NUL byte"
    import unicodedata  # here: the keeper's idle memory does without it

    for ch in value:
        # Control and format characters (C0/C1 controls, bidi overrides,
        # zero-width joiners) have no place in a path and would make audit
        # lines and messages lie about what was asked for.
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Cs", "Co", "Cn"):
            return f"{what} contains the control or format character U+{ord(ch):04X}"
    return None


def validate_request(req: StartFields) -> list[tuple[str, str]]:
    """Malformed-request checks that do not depend on the policy: (rule, message) pairs."""
    out: list[tuple[str, str]] = []

    def bad(rule: str, msg: str) -> None:
        out.append((rule, msg))

    p = text_problem(req.command, "command", MAX_PATH_BYTES)
    if p:
        bad("malformed-command", p)
    if req.path != "":
        p = text_problem(req.path, "path", MAX_PATH_BYTES)
        if p:
            bad("malformed-path", p)
    if len(req.args) > MAX_ARGS:
        bad("too-many-args", f"{len(req.args)} arguments, at most {MAX_ARGS} are accepted")
    else:
        for i, a in enumerate(req.args):
            if "\x00" in a:
                bad("malformed-arg", f"argument {i} contains a NUL byte")
            elif len(a.encode("utf-8", "surrogatepass")) > MAX_ARG_BYTES:
                bad("arg-too-long", f"argument {i} is longer than {MAX_ARG_BYTES} bytes")
    if req.path == "" and req.args:
        bad("args-without-path", "arguments were given but path is empty")
    if len(req.env) > MAX_ENV:
        bad("too-many-env", f"{len(req.env)} environment variables, at most {MAX_ENV}")
    else:
        for k, v in req.env.items():
            if not ENV_NAME.match(k):
                bad("malformed-env", f"environment variable name {k[:64]!r} is not a valid name")
            elif "\x00" in v or len(v.encode("utf-8", "surrogatepass")) > MAX_ENV_VALUE_BYTES:
                bad(
                    "malformed-env",
                    f"value of {k} contains NUL or is longer than {MAX_ENV_VALUE_BYTES} bytes",
                )
    return out


def start_bounds(
    command: str, path: str, args: Sequence[str], env: Mapping[str, str], secret_args: Sequence[int]
) -> None:
    """Refuse an oversize StartJob request before anything else looks at it.

    The cheapest checks come first: counts (O(1) on protobuf containers),
    then string lengths in characters (a character is at least one byte,
    so more characters than the byte cap is always too long), then one
    bounded pass over the items. Raises InvalidArgument naming the field.
    """
    if len(args) > MAX_ARGS:
        raise InvalidArgument(
            f"args: {len(args)} arguments, at most {MAX_ARGS} are accepted", rule="too-many-args"
        )
    if len(env) > MAX_ENV:
        raise InvalidArgument(
            f"env: {len(env)} variables, at most {MAX_ENV} are accepted", rule="too-many-env"
        )
    if len(secret_args) > MAX_SECRET_ARGS:
        raise InvalidArgument(
            f"secretArgs: {len(secret_args)} indexes, at most {MAX_SECRET_ARGS} are accepted",
            rule="too-many-secret-args",
        )
    for what, value in (("command", command), ("path", path)):
        if len(value) > MAX_PATH_BYTES:
            raise InvalidArgument(
                f"{what} is longer than {MAX_PATH_BYTES} bytes", rule=f"malformed-{what}"
            )
    total = 0
    for i, a in enumerate(args):
        if len(a) > MAX_ARG_BYTES:
            raise InvalidArgument(
                f"argument {i} is longer than {MAX_ARG_BYTES} bytes", rule="arg-too-long"
            )
        total += len(a)
    for k, v in env.items():
        if len(k) > MAX_ENV_NAME_BYTES or len(v) > MAX_ENV_VALUE_BYTES:
            raise InvalidArgument(
                f"env: a variable name is longer than {MAX_ENV_NAME_BYTES} "
                f"bytes or a value longer than {MAX_ENV_VALUE_BYTES}",
                rule="malformed-env",
            )
        total += len(k) + len(v)
    if total > MAX_EXEC_BYTES:
        raise InvalidArgument(
            f"args and env together are longer than {MAX_EXEC_BYTES} bytes",
            rule="request-too-large",
        )


def list_bounds(states: Sequence[int], owner: str, page_token: str) -> None:
    """Refuse an oversize ListJobs request before any query is built."""
    if len(states) > MAX_STATES:
        raise InvalidArgument(
            f"states: {len(states)} given, at most {MAX_STATES} are accepted",
            rule="too-many-states",
        )
    if len(owner) > MAX_OWNER_BYTES:
        raise InvalidArgument(
            f"owner is longer than {MAX_OWNER_BYTES} bytes", rule="owner-too-long"
        )
    if len(page_token) > MAX_PAGE_TOKEN_CHARS:
        raise InvalidArgument("pageToken is not one this agent issued", rule="bad-page-token")


# ---------------------------------------------------------------- ids, pages, offsets

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
# No output file can be this large; a larger offset would overflow pread's
# off_t (OverflowError, or EINVAL near 2**63) instead of being refused.
MAX_STREAM_OFFSET = 1 << 62


# Exactly the strings str(uuid.UUID(x)) gives back unchanged: lower-case hex
# in 8-4-4-4-12 groups (any version). A regex, because this runs on every
# QueryJob and StopJob and uuid.UUID costs several times as much.
_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def job_id(value: str) -> str:
    """A job id in the form this agent issues (canonical UUID), or InvalidArgument."""
    if isinstance(value, str) and _JOB_ID.fullmatch(value):
        return value
    raise InvalidArgument(
        "jobID is not a valid job id (a UUID as returned by StartJob)", rule="bad-job-id"
    )


MAX_REQUEST_KEY = 128
_REQUEST_KEY = re.compile(rf"[A-Za-z0-9._:/-]{{1,{MAX_REQUEST_KEY}}}")


def request_key(value: str) -> str:
    """StartJob's requestKey: empty, or up to 128 of A-Z a-z 0-9 . _ : / - (it goes into
    the history database and the audit log as it is); else InvalidArgument."""
    if value == "" or _REQUEST_KEY.fullmatch(value):
        return value
    raise InvalidArgument(
        f"requestKey: at most {MAX_REQUEST_KEY} characters, each a letter, a digit or one "
        "of . _ : / -",
        rule="bad-request-key",
    )


def states(values: Iterable[int]) -> list[JobState]:
    """Wire state numbers -> distinct states; InvalidArgument for an unknown one or too many."""
    out: list[JobState] = []
    values = list(itertools.islice(values, MAX_STATES + 1))
    if len(values) > MAX_STATES:
        raise InvalidArgument(f"states: at most {MAX_STATES} are accepted", rule="too-many-states")
    for v in values:
        try:
            s = JobState(v)
        except ValueError:
            raise InvalidArgument(f"states: {v} is not a job state", rule="bad-state") from None
        if s not in out:
            out.append(s)
    return out


def page_size(value: int) -> int:
    """The page size to use (0: the default); InvalidArgument above the maximum."""
    if value > MAX_PAGE_SIZE or value < 0:
        raise InvalidArgument(
            f"pageSize must be at most {MAX_PAGE_SIZE} (and not negative)", rule="page-size"
        )
    return value or DEFAULT_PAGE_SIZE


def stream_offset(value: int) -> int:
    """A StreamJobOutput offset, or InvalidArgument."""
    if not 0 <= value <= MAX_STREAM_OFFSET:
        raise InvalidArgument(f"offset must be at most {MAX_STREAM_OFFSET}", rule="bad-offset")
    return value


def encode_page_token(seq: int) -> str:
    """The opaque ListJobs token for "older than ``seq``"."""
    import base64  # here: the job keeper validates requests but pages nothing

    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode().rstrip("=")


def decode_page_token(token: str) -> int:
    """The sequence number in a token this agent issued, or InvalidArgument."""
    import base64

    try:
        if len(token) > MAX_PAGE_TOKEN_CHARS:
            raise ValueError
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        tag, _, num = raw.partition(":")
        # At most 18 ASCII digits: a sequence number SQLite can hold (a
        # longer one would raise OverflowError in the query, not be refused).
        if tag != "v1" or not (num.isascii() and num.isdigit()) or len(num) > 18:
            raise ValueError
        return int(num)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(
            "pageToken is not one this agent issued", rule="bad-page-token"
        ) from None
