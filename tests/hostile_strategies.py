"""Hypothesis strategies for hostile requests (used by tests/test_hostile.py).

The strategies build requests from pieces an attacker would reach for:
control and format characters, look-alike characters, path tricks, shell
metacharacters, dangerous environment names, near-miss job ids and page
tokens, and raw protobuf bytes that do not decode. Path strategies are
anchored in the directories of the test world (so many requests land inside
or next to the allowed script locations) and in well-known system places.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from helpers import pb

# ---------------------------------------------------------------- characters

CONTROL = ["\x00", "\x01", "\x07", "\x08", "\t", "\n", "\r", "\x1b", "\x7f", "\x85", "\x9b"]
FORMAT = [
    "\u200b",  # zero-width space
    "\u200c",  # zero-width non-joiner
    "\u200d",  # zero-width joiner
    "\u200e",  # left-to-right mark
    "\u202e",  # right-to-left override
    "\u2066",  # left-to-right isolate
    "\ufeff",  # byte order mark
]
LOOKALIKE = [
    "\uff0f",  # fullwidth solidus
    "\u2215",  # division slash
    "\u2044",  # fraction slash
    "\u29f8",  # big solidus
    "\u2024",  # one dot leader (looks like '.')
    "\uff0e",  # fullwidth full stop
    "\u0430",  # Cyrillic a
    "\u0435",  # Cyrillic e
    "\u043e",  # Cyrillic o
    "\u0455",  # Cyrillic dze (looks like 's')
    "\u0301",  # combining acute accent
    "\u0338",  # combining long solidus overlay
    "\u00a0",  # no-break space
    "\u2028",  # line separator
    "\ufffd",  # replacement character
    "\U0001f4a9",
]
SHELL = [
    ";",
    "|",
    "&&",
    "$(touch pwned)",
    "`id`",
    ">",
    "<",
    "*",
    "?",
    "[",
    "]",
    "~",
    "$IFS",
    "'",
    '"',
    "\\",
    "%s",
    "%n",
    "{a,b}",
    "-c",
    "--",
    "-",
]
WEIRD = CONTROL + FORMAT + LOOKALIKE + SHELL

# one family first, then a member: each family is equally likely
weird_char = st.sampled_from([CONTROL, FORMAT, LOOKALIKE, SHELL]).flatmap(st.sampled_from)
# Mostly printable text with a generous share of hostile characters.
hostile_text = st.lists(
    st.one_of(weird_char, st.text(max_size=4), st.sampled_from(["..", ".", "/", "//", "sh"])),
    max_size=8,
).map("".join)


def mutate(s: str) -> st.SearchStrategy[str]:
    """``s`` with one hostile edit (insert, replace or append a weird piece)."""
    if not s:
        return hostile_text

    @st.composite
    def edit(draw: st.DrawFn) -> str:
        i = draw(st.integers(0, len(s)))
        piece = draw(
            st.one_of(weird_char, weird_char, st.sampled_from(["/", "//", "/./", "/../", "..", ""]))
        )
        how = draw(st.sampled_from(["insert", "replace", "append", "prepend"]))
        if how == "insert":
            return s[:i] + piece + s[i:]
        if how == "replace" and i < len(s):
            return s[:i] + piece + s[i + 1 :]
        if how == "prepend":
            return piece + s
        return s + piece

    return edit()


# ---------------------------------------------------------------- paths


SEPARATORS = ["/", "/", "/", "//", "/./", "/../", "\uff0f", "/\u200d", "/\x00"]
COMPONENTS = [
    "..",
    ".",
    "",
    "nope.sh",
    "x.sh",
    "*.sh",
    "**",
    "?",
    " ",
    "-c",
    "etc",
    "passwd",
    "shadow",
    "null",
    "self",
    "fd",
    "0",
    "proc",
    "...",
]


def paths(anchors: Sequence[str], names: Sequence[str]) -> st.SearchStrategy[str]:
    """Path-like strings rooted in ``anchors`` using ``names`` and tricks."""

    @st.composite
    def build(draw: st.DrawFn) -> str:
        out = draw(st.sampled_from(list(anchors)))
        for _ in range(draw(st.integers(0, 3))):
            sep = draw(st.sampled_from(SEPARATORS))
            known = st.sampled_from(list(names) + COMPONENTS)
            comp = draw(st.one_of(known, known, hostile_text))
            out += sep + comp
        if draw(st.booleans()):
            out += draw(st.sampled_from(["", "/", "/.", "/..", "\x00", "\u202e", " "]))
        return out

    return st.one_of(build(), build().flatmap(mutate), hostile_text)


# ---------------------------------------------------------------- requests

DANGEROUS_ENV = [
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "BASH_ENV",
    "ENV",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PATH",
    "HOME",
    "IFS",
    "SHELLOPTS",
    "BASH_FUNC_x%%",
    "PERL5OPT",
    "NODE_OPTIONS",
    "GCONV_PATH",
    "AGENT_JOB_ID",
    "AGENT_INSTANCE",
    "GLIBC_TUNABLES",
    "TMPDIR",
]
BAD_ENV_NAMES = [
    "",
    "=",
    "A=B",
    "1X",
    "A B",
    "A\x00B",
    "A\nB",
    "\u202eX",
    "X\u200d",
    "-x",
    "A-B",
    "\uff21",
]
env_names = st.one_of(
    st.sampled_from(DANGEROUS_ENV + BAD_ENV_NAMES + ["CANARY_OK", "FOO"]), hostile_text
)
env_maps = st.dictionaries(env_names, hostile_text, max_size=5)

UINT32 = 2**32 - 1
UINT64 = 2**64 - 1


def limits() -> st.SearchStrategy[pb.Limits]:
    """Resource limit messages with arbitrary (also absurd) values."""
    v = st.one_of(st.none(), st.sampled_from([0, 1, 2**31, 2**63, UINT64]), st.integers(0, UINT64))
    return st.builds(
        lambda a, b, c, d, e: pb.Limits(
            **{
                k: x
                for k, x in zip(
                    ("cpuSeconds", "memoryBytes", "openFiles", "processes", "outputBytes"),
                    (a, b, c, d, e),
                    strict=True,
                )
                if x is not None
            }
        ),
        v,
        v,
        v,
        v,
        v,
    )


def clean_paths(anchors: Sequence[str], names: Sequence[str]) -> st.SearchStrategy[str]:
    """Plausible absolute or relative paths: an anchor and a few known names."""
    name = st.sampled_from([*names, "nope.sh", "x.sh", "..", "."])
    return st.builds(
        lambda a, parts: "/".join([a.rstrip("/") if a != "/" else "", *parts]) or "/",
        st.sampled_from(list(anchors)),
        st.one_of(
            st.lists(name, min_size=1, max_size=1),
            st.lists(name, min_size=1, max_size=1),
            st.lists(name, max_size=3),
        ),
    )


PLAIN_ARGS = ["a", "abc", "1", "0.5", "-c", "--help", "x" * 70, "$(id)", "", "a b", "A"]
PLAIN_ENV = ["CANARY_OK", "FOO", "canary_ok", *DANGEROUS_ENV]
FIELDS = ("command", "path", "args", "env", "secret")


def start_requests(
    commands: Sequence[str],
    anchors: Sequence[str],
    names: Sequence[str],
    near_commands: Sequence[str] = (),
) -> st.SearchStrategy[pb.StartJobReq]:
    """StartJobReq messages: plausible, with zero to three hostile fields.

    Choosing which fields are hostile (rather than making every field hostile
    some of the time) keeps many requests well-formed, so they reach the
    policy's command, argument, environment and file checks instead of all
    being stopped by the first malformed character.
    """
    known = st.sampled_from(list(commands))
    clean = clean_paths(anchors, names)
    plausible: dict[str, st.SearchStrategy[Any]] = {
        "command": known,
        "path": clean,
        "args": st.one_of(
            st.just([]), st.just([]), st.lists(st.sampled_from(["a", "abc", "1"]), max_size=2)
        ),
        "env": st.one_of(st.just({}), st.just({"CANARY_OK": "1"})),
        "secret": st.just([]),
    }
    hostile: dict[str, st.SearchStrategy[Any]] = {
        "command": st.one_of(
            known.flatmap(mutate),
            hostile_text,
            st.sampled_from(list(near_commands) or ["/bin//bash"]),
        ),
        "path": st.one_of(clean.flatmap(mutate), paths(anchors, names), st.just("")),
        "args": st.one_of(
            st.lists(st.sampled_from(PLAIN_ARGS), min_size=1, max_size=5),
            st.lists(st.one_of(hostile_text, paths(anchors, names)), min_size=1, max_size=6),
            st.lists(st.sampled_from(PLAIN_ARGS), min_size=30, max_size=80),
        ),
        "env": st.one_of(
            st.dictionaries(
                st.sampled_from(PLAIN_ENV), st.sampled_from(["1", ""]), min_size=1, max_size=3
            ),
            env_maps,
        ),
        "secret": st.lists(st.sampled_from([0, 1, 5, UINT32]), min_size=1, max_size=3),
    }

    @st.composite
    def build(draw: st.DrawFn) -> pb.StartJobReq:
        bad = draw(st.sets(st.sampled_from(FIELDS), max_size=3))
        v = {f: draw(hostile[f] if f in bad else plausible[f]) for f in FIELDS}
        req = pb.StartJobReq(
            command=v["command"],
            path=v["path"],
            args=v["args"],
            env=v["env"],
            secretArgs=v["secret"],
        )
        if draw(st.booleans()):
            req.timeoutSeconds = draw(st.sampled_from([0, 1, UINT32]))
        if draw(st.booleans()):
            req.limits.CopyFrom(draw(limits()))
        return req

    return build()


# ---------------------------------------------------------------- job ids, tokens

_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_canonical_uuid(s: str) -> bool:
    """The job id form the agent issues (lower-case, dashed UUID)."""
    return _CANONICAL_UUID.fullmatch(s) is not None


def _uuid_variants(u: uuid.UUID) -> list[str]:
    s = str(u)
    return [
        s,
        s.upper(),
        "{" + s + "}",
        "urn:uuid:" + s,
        u.hex,
        " " + s,
        s + "\n",
        s + "\x00",
        s[:-1],
        s + "0",
        s.replace("-", "\u2010"),
        s[:8] + "\u200d" + s[8:],
        s.replace("a", "\u0430"),
        s + "/../x",
        "../" + s,
        s + ".out",
        "00000000-0000-0000-0000-000000000000",
    ]


job_ids = st.one_of(
    st.uuids().flatmap(lambda u: st.sampled_from(_uuid_variants(u))),
    st.uuids().map(str).flatmap(mutate),
    hostile_text,
    st.just(""),
    st.text(max_size=80),
)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


page_tokens = st.one_of(
    hostile_text,
    st.text(max_size=40),
    st.binary(max_size=40).map(_b64),
    st.sampled_from(
        [
            "v1:",
            "v1:-1",
            "v1:1e9",
            "v1:0x10",
            "v2:5",
            "v1: 5",
            "v1:\u0665",
            "v1:99999999999999999999",
            "v1:" + "9" * 19,
            "v1:9223372036854775807",
            "v1:9223372036854775808",
        ]
    ).map(lambda s: _b64(s.encode())),
    st.integers(0, 10**30).map(lambda n: _b64(f"v1:{n}".encode())),
)

list_requests = st.builds(
    lambda states, owner, size, token: pb.ListJobsReq(
        states=states, owner=owner, pageSize=size, pageToken=token
    ),
    st.lists(st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(0, 8)), max_size=4),
    st.one_of(
        st.just(""), st.just("client"), st.sampled_from(["admin", "scheduler"]), hostile_text
    ),
    st.one_of(st.integers(0, 1200), st.just(UINT32)),
    st.one_of(st.just(""), page_tokens),
)


# ---------------------------------------------------------------- raw bytes

WORKER_METHODS = ["StartJob", "StopJob", "QueryJob", "WaitJob", "ListJobs", "StreamJobOutput"]

BAD_UTF8 = [
    b"\xc0\xaf",  # overlong '/'
    b"\xe0\x80\xaf",  # overlong '/' (3 bytes)
    b"\xc0\x80",  # overlong NUL
    b"\xed\xa0\x80",  # UTF-16 surrogate
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xff",
    b"\xfe\xff",
    b"\x80",  # lone continuation byte
    b"\xe2\x80",  # truncated sequence
]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def length_delimited(field: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field, encoded by hand."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def bad_utf8_strings() -> st.SearchStrategy[bytes]:
    """Text with an invalid UTF-8 sequence somewhere."""
    return st.builds(
        lambda a, bad, b: a.encode() + bad + b.encode(),
        st.text(max_size=6),
        st.sampled_from(BAD_UTF8),
        st.text(max_size=6),
    )


raw_messages = st.one_of(
    st.binary(max_size=64),
    # string field 1..4 (command, path, args, pageToken...) with bad UTF-8
    st.builds(length_delimited, st.integers(1, 4), bad_utf8_strings()),
    # env map entry (field 4 of StartJobReq) whose key or value is bad UTF-8
    st.builds(
        lambda k, v: length_delimited(4, length_delimited(1, k) + length_delimited(2, v)),
        st.one_of(bad_utf8_strings(), st.just(b"CANARY_OK")),
        st.one_of(bad_utf8_strings(), st.just(b"x")),
    ),
    # a valid-looking message with a truncated tail
    st.builds(
        lambda b, cut: b[:cut],
        st.just(length_delimited(1, b"bash") + length_delimited(2, b"/etc/passwd")),
        st.integers(0, 18),
    ),
    # varints that never end, huge lengths, group wire types, field number 0
    st.sampled_from(
        [
            b"\x0a\xff\xff\xff\xff\x0f",
            b"\x08" + b"\xff" * 11,
            b"\x0b\x0c",
            b"\x00\x00",
            b"\x0f",
            b"\x1a\x80\x80\x80\x80\x80\x01",
            b"\x7a\x00",
            b"\xf8\xff\xff\xff\x0f\x01",
        ]
    ),
)
