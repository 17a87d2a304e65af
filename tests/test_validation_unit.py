"""Request validation (agent.keeper.validation): every refusal, its rule and its message.

Every refusal here is INVALID_ARGUMENT on the wire (through the one status table,
agent.rpc.STATUS) and names the field at fault; the bounds are exact (the cap itself
passes, one more is refused). Plain values only: no server, no protobuf.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.keeper import validation as v
from agent.keeper.errors import InvalidArgument
from agent.rpc import STATUS
from agent.vocabulary import JobState, Kind


@dataclass(frozen=True)
class Req:
    """A start request with the fields validate_request reads."""

    command: str = "/bin/true"
    path: str = ""
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)


def _invalid(call: Callable[[], object], rule: str) -> str:
    """Run ``call``, expect INVALID_ARGUMENT with ``rule``; the message."""
    with pytest.raises(InvalidArgument) as e:
        call()
    assert e.value.kind is Kind.INVALID_ARGUMENT
    assert STATUS[e.value.kind] is grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.rule == rule
    return e.value.message


# ---------------------------------------------------------------- text_problem


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "command is empty"),
        ("a" * 4097, "command is longer than 4096 bytes"),
        ("é" * 2049, "command is longer than 4096 bytes"),  # 2049 characters, 4098 bytes
        ("/bin/t\x00rue", "command contains a NUL byte"),
        ("/bin/\x1btrue", "command contains the control or format character U+001B"),
        ("/bin/true\n", "command contains the control or format character U+000A"),
        ("/bin/\x85x", "command contains the control or format character U+0085"),  # C1
        ("/bin/\u202ex", "command contains the control or format character U+202E"),  # bidi
        ("/bin/a\u200db", "command contains the control or format character U+200D"),  # ZWJ
        ("/bin/\ud800", "command contains the control or format character U+D800"),  # surrogate
        ("/bin/\ue000", "command contains the control or format character U+E000"),  # private
        ("/bin/\u0378", "command contains the control or format character U+0378"),  # unassigned
    ],
)
def test_text_problem_names_what_is_wrong(value: str, problem: str) -> None:
    """Empty, too many bytes, NUL, control or format characters: each named, with its code."""
    assert v.text_problem(value, "command", v.MAX_PATH_BYTES) == problem


@pytest.mark.parametrize("value", ["/bin/true", "a" * 4096, "é" * 2048, "/opt/日本/x y", "/-_.~"])
def test_text_problem_accepts_printable_text_up_to_the_cap(value: str) -> None:
    """Printable text of any script, up to the byte cap itself, is well-formed."""
    assert v.text_problem(value, "command", v.MAX_PATH_BYTES) is None


# ---------------------------------------------------------------- validate_request


def test_a_clean_request_has_no_problem() -> None:
    """Command, path, arguments and environment within bounds: no (rule, message) pair."""
    req = Req("bash", "/s.sh", ["a", "", "x" * v.MAX_ARG_BYTES], {"_A1": "", "B": "v" * 100})
    assert v.validate_request(req) == []
    assert v.validate_request(Req()) == []


def test_malformed_command_and_path() -> None:
    """A malformed command or path is reported with its own rule; an empty path is fine."""
    assert v.validate_request(Req(command="")) == [("malformed-command", "command is empty")]
    assert v.validate_request(Req(path="/x\x00")) == [
        ("malformed-path", "path contains a NUL byte")
    ]


def test_too_many_args_stops_the_per_argument_checks() -> None:
    """Over MAX_ARGS: one problem, and no scan of the (many) arguments themselves."""
    req = Req(path="/p", args=["\x00"] * (v.MAX_ARGS + 1))
    assert v.validate_request(req) == [
        ("too-many-args", f"{v.MAX_ARGS + 1} arguments, at most {v.MAX_ARGS} are accepted")
    ]
    assert v.validate_request(Req(path="/p", args=["a"] * v.MAX_ARGS)) == []


def test_each_bad_argument_is_named_by_index() -> None:
    """A NUL byte or more than MAX_ARG_BYTES (in UTF-8) in an argument: named by its index."""
    args = ["ok", "a\x00b", "é" * (v.MAX_ARG_BYTES // 2 + 1)]
    assert v.validate_request(Req(path="/p", args=args)) == [
        ("malformed-arg", "argument 1 contains a NUL byte"),
        ("arg-too-long", f"argument 2 is longer than {v.MAX_ARG_BYTES} bytes"),
    ]


def test_arguments_need_a_path() -> None:
    """Arguments without a path are refused (the path is the first argument)."""
    assert v.validate_request(Req(args=["a"])) == [
        ("args-without-path", "arguments were given but path is empty")
    ]


def test_too_many_env() -> None:
    """Over MAX_ENV variables: one problem; exactly MAX_ENV is fine."""
    env = {f"V{i}": "" for i in range(v.MAX_ENV + 1)}
    assert v.validate_request(Req(env=env)) == [
        ("too-many-env", f"{v.MAX_ENV + 1} environment variables, at most {v.MAX_ENV}")
    ]
    env.pop("V0")
    assert v.validate_request(Req(env=env)) == []


@pytest.mark.parametrize("name", ["", "1A", "A-B", "A B", "FOO\n", "A=B", "É", "A\x00"])
def test_malformed_env_names(name: str) -> None:
    """Names outside [A-Za-z_][A-Za-z0-9_]* (a trailing newline included) are refused."""
    assert v.validate_request(Req(env={name: "v"})) == [
        ("malformed-env", f"environment variable name {name[:64]!r} is not a valid name")
    ]


def test_a_long_env_name_is_cut_in_the_message() -> None:
    """The message quotes at most 64 characters of a bad name."""
    [(rule, msg)] = v.validate_request(Req(env={"-" * 1000: "v"}))
    assert rule == "malformed-env" and msg.count("-") == 64


@pytest.mark.parametrize("value", ["a\x00", "é" * (v.MAX_ENV_VALUE_BYTES // 2 + 1)])
def test_malformed_env_values(value: str) -> None:
    """A value with NUL or over MAX_ENV_VALUE_BYTES (UTF-8) is refused, naming the variable."""
    assert v.validate_request(Req(env={"K": value})) == [
        (
            "malformed-env",
            f"value of K contains NUL or is longer than {v.MAX_ENV_VALUE_BYTES} bytes",
        )
    ]


def test_every_problem_is_reported_at_once() -> None:
    """A request wrong in several ways gets every problem, in field order."""
    req = Req(command="", path="", args=["a"], env={"1": "v"})
    assert [rule for rule, _ in v.validate_request(req)] == [
        "malformed-command",
        "args-without-path",
        "malformed-env",
    ]


def test_a_malformed_request_is_refused_as_invalid_argument_by_the_policy() -> None:
    """The policy asks validate_request first: every problem becomes one INVALID_ARGUMENT
    refusal naming each (message and rules), before any entry is looked at."""
    from agent.keeper import policy

    req = policy.JobRequest(command="/bin/\x1b", path="", args=("a",), env={"1": ""})
    decision = policy.decide(policy.Policy(entries=()), req)
    assert not decision.allowed
    e = decision.error()
    assert isinstance(e, InvalidArgument) and STATUS[e.kind] is grpc.StatusCode.INVALID_ARGUMENT
    assert e.rule == "args-without-path,malformed-command,malformed-env"
    assert e.message == (
        "not started: command contains the control or format character U+001B "
        "[malformed-command]; arguments were given but path is empty [args-without-path]; "
        "environment variable name '1' is not a valid name [malformed-env]"
    )


# ---------------------------------------------------------------- start_bounds


def _start(
    command: str = "/bin/true",
    path: str = "",
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    secret_args: Sequence[int] = (),
) -> None:
    v.start_bounds(command, path, args, env or {}, secret_args)


def test_start_bounds_pass_at_every_cap() -> None:
    """Every count and length at its cap (and the total just under it) passes."""
    _start("c" * v.MAX_PATH_BYTES, "p" * v.MAX_PATH_BYTES)
    _start(args=["a"] * v.MAX_ARGS, secret_args=list(range(v.MAX_SECRET_ARGS)))
    _start(env={f"V{i}": "" for i in range(v.MAX_ENV)})
    _start(args=["a" * v.MAX_ARG_BYTES] * 8)  # exactly MAX_EXEC_BYTES together


@pytest.mark.parametrize(
    ("kw", "rule", "message"),
    [
        (
            {"args": ["a"] * 1025},
            "too-many-args",
            "args: 1025 arguments, at most 1024 are accepted",
        ),
        (
            {"env": {f"V{i}": "" for i in range(65)}},
            "too-many-env",
            "env: 65 variables, at most 64 are accepted",
        ),
        (
            {"secret_args": [0] * 1025},
            "too-many-secret-args",
            "secretArgs: 1025 indexes, at most 1024 are accepted",
        ),
        ({"command": "c" * 4097}, "malformed-command", "command is longer than 4096 bytes"),
        ({"path": "p" * 4097}, "malformed-path", "path is longer than 4096 bytes"),
        (
            {"args": ["a", "b" * (128 * 1024 + 1)]},
            "arg-too-long",
            "argument 1 is longer than 131072 bytes",
        ),
        (
            {"env": {"N" * 257: ""}},
            "malformed-env",
            "env: a variable name is longer than 256 bytes or a value longer than 32768",
        ),
        (
            {"env": {"N": "v" * (32 * 1024 + 1)}},
            "malformed-env",
            "env: a variable name is longer than 256 bytes or a value longer than 32768",
        ),
        (
            {"args": ["a" * (128 * 1024)] * 8, "env": {"K": ""}},
            "request-too-large",
            "args and env together are longer than 1048576 bytes",
        ),
    ],
)
def test_start_bounds_refuse_each_oversize_field(
    kw: dict[str, object], rule: str, message: str
) -> None:
    """One over any cap is INVALID_ARGUMENT naming the field and the cap."""
    assert _invalid(partial(_start, **kw), rule) == message  # type: ignore[arg-type]


def test_start_bounds_check_counts_before_lengths() -> None:
    """The O(1) counts answer first: too many args wins over an overlong command."""
    _invalid(partial(_start, "c" * 5000, args=["a"] * 2000), "too-many-args")


# ---------------------------------------------------------------- ListJobs


def test_list_bounds() -> None:
    """Too many states, an overlong owner or page token: each refused by its rule; the caps
    themselves pass."""
    v.list_bounds([1] * v.MAX_STATES, "o" * v.MAX_OWNER_BYTES, "t" * v.MAX_PAGE_TOKEN_CHARS)
    msg = _invalid(partial(v.list_bounds, [1] * 17, "", ""), "too-many-states")
    assert msg == "states: 17 given, at most 16 are accepted"
    msg = _invalid(partial(v.list_bounds, [], "o" * 1025, ""), "owner-too-long")
    assert msg == "owner is longer than 1024 bytes"
    msg = _invalid(partial(v.list_bounds, [], "", "t" * 65), "bad-page-token")
    assert msg == "pageToken is not one this agent issued"


def test_states_are_distinct_in_the_order_given() -> None:
    """Wire numbers become states, duplicates dropped, first occurrence first."""
    assert v.states([3, 1, 3, 1, 6]) == [JobState.FAILED, JobState.RUNNING, JobState.LOST]
    assert v.states([]) == []


@pytest.mark.parametrize("value", [0, 7, -1, 1 << 40])
def test_an_unknown_state_is_refused(value: int) -> None:
    """A number that is no job state is refused by name."""
    assert (
        _invalid(partial(v.states, [1, value]), "bad-state")
        == f"states: {value} is not a job state"
    )


def test_states_read_at_most_one_more_than_the_cap() -> None:
    """An endless iterable is refused after MAX_STATES + 1 items, not read to its end."""
    assert _invalid(partial(v.states, itertools.repeat(1)), "too-many-states") == (
        "states: at most 16 are accepted"
    )
    assert len(v.states([1] * v.MAX_STATES)) == 1


def test_page_size() -> None:
    """0 is the default; 1 to MAX_PAGE_SIZE as given; negative or more refused."""
    assert v.page_size(0) == v.DEFAULT_PAGE_SIZE
    assert v.page_size(1) == 1 and v.page_size(v.MAX_PAGE_SIZE) == v.MAX_PAGE_SIZE
    for bad in (-1, v.MAX_PAGE_SIZE + 1):
        msg = _invalid(partial(v.page_size, bad), "page-size")
        assert msg == "pageSize must be at most 1000 (and not negative)"


def test_stream_offset() -> None:
    """Offsets 0 to MAX_STREAM_OFFSET pass; negative or beyond (pread would overflow) do not."""
    assert v.stream_offset(0) == 0 and v.stream_offset(v.MAX_STREAM_OFFSET) == v.MAX_STREAM_OFFSET
    for bad in (-1, v.MAX_STREAM_OFFSET + 1, 1 << 63):
        assert _invalid(partial(v.stream_offset, bad), "bad-offset") == (
            f"offset must be at most {v.MAX_STREAM_OFFSET}"
        )


# ---------------------------------------------------------------- job ids


@given(st.uuids())
def test_every_canonical_uuid_is_a_job_id(u: uuid.UUID) -> None:
    """Property: str(uuid) of any version is accepted unchanged."""
    assert v.job_id(str(u)) == str(u)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "not-a-uuid",
        "6F9619FF-8B86-D011-B42D-00C04FC964FF",  # upper case
        "{6f9619ff-8b86-d011-b42d-00c04fc964ff}",
        "6f9619ff8b86d011b42d00c04fc964ff",  # no dashes
        "urn:uuid:6f9619ff-8b86-d011-b42d-00c04fc964ff",
        "6f9619ff-8b86-d011-b42d-00c04fc964ff\n",
        " 6f9619ff-8b86-d011-b42d-00c04fc964ff",
        "6f9619ff-8b86-d011-b42d-00c04fc964f",
        "6f9619ff-8b86-d011-b42d-00c04fc964fff",
        "6f9619ff-8b86-d011-b42d-00c04fc964fg",
        "../../etc/passwd",
    ],
)
def test_anything_else_is_not_a_job_id(value: str) -> None:
    """Only the canonical lower-case form is a job id; anything else is bad-job-id."""
    assert _invalid(partial(v.job_id, value), "bad-job-id") == (
        "jobID is not a valid job id (a UUID as returned by StartJob)"
    )


def test_a_non_string_is_not_a_job_id() -> None:
    """A value of another type is refused, not raised on."""
    _invalid(partial(v.job_id, 123), "bad-job-id")  # type: ignore[arg-type]


# ---------------------------------------------------------------- page tokens


@given(st.integers(min_value=0, max_value=10**18 - 1))
def test_page_tokens_round_trip(seq: int) -> None:
    """Property: every sequence number SQLite can hold comes back from its token, which fits
    the ListJobs bound."""
    token = v.encode_page_token(seq)
    assert len(token) <= v.MAX_PAGE_TOKEN_CHARS
    v.list_bounds([], "", token)
    assert v.decode_page_token(token) == seq


def _b64(raw: str) -> str:
    import base64

    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "!!!!",
        _b64("v2:5"),
        _b64("v1:"),
        _b64("v1:-5"),
        _b64("v1:5x"),
        _b64("v1: 5"),
        _b64("v1:" + "9" * 19),
        _b64("v1:١٢"),  # Arabic-Indic digits: isdigit() but not ASCII
        _b64("5"),
        "A" * 65,
        "\udcff",
    ],
)
def test_tokens_this_agent_did_not_issue_are_refused(token: str) -> None:
    """Garbage, another version, no or non-ASCII digits, more than 18 digits, overlong:
    bad-page-token, never a crash."""
    assert _invalid(partial(v.decode_page_token, token), "bad-page-token") == (
        "pageToken is not one this agent issued"
    )
