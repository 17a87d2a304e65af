import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    STOPPED: _ClassVar[JobState]
    TIMED_OUT: _ClassVar[JobState]
    LOST: _ClassVar[JobState]

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_RUNNING: _ClassVar[RunState]
    RUN_DONE: _ClassVar[RunState]
    RUN_CANCELLED: _ClassVar[RunState]
    RUN_INTERRUPTED: _ClassVar[RunState]

class HostState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOST_STATE_UNSPECIFIED: _ClassVar[HostState]
    HOST_PENDING: _ClassVar[HostState]
    HOST_STARTING: _ClassVar[HostState]
    HOST_RUNNING: _ClassVar[HostState]
    HOST_SUCCEEDED: _ClassVar[HostState]
    HOST_FAILED: _ClassVar[HostState]
    HOST_NOT_STARTED: _ClassVar[HostState]
    HOST_UNREACHABLE: _ClassVar[HostState]
    HOST_UNKNOWN: _ClassVar[HostState]
JOB_STATE_UNSPECIFIED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
STOPPED: JobState
TIMED_OUT: JobState
LOST: JobState
RUN_STATE_UNSPECIFIED: RunState
RUN_RUNNING: RunState
RUN_DONE: RunState
RUN_CANCELLED: RunState
RUN_INTERRUPTED: RunState
HOST_STATE_UNSPECIFIED: HostState
HOST_PENDING: HostState
HOST_STARTING: HostState
HOST_RUNNING: HostState
HOST_SUCCEEDED: HostState
HOST_FAILED: HostState
HOST_NOT_STARTED: HostState
HOST_UNREACHABLE: HostState
HOST_UNKNOWN: HostState

class Limits(_message.Message):
    __slots__ = ("cpuSeconds", "memoryBytes", "openFiles", "processes", "outputBytes")
    CPUSECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORYBYTES_FIELD_NUMBER: _ClassVar[int]
    OPENFILES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTBYTES_FIELD_NUMBER: _ClassVar[int]
    cpuSeconds: int
    memoryBytes: int
    openFiles: int
    processes: int
    outputBytes: int
    def __init__(self, cpuSeconds: _Optional[int] = ..., memoryBytes: _Optional[int] = ..., openFiles: _Optional[int] = ..., processes: _Optional[int] = ..., outputBytes: _Optional[int] = ...) -> None: ...

class StartJobReq(_message.Message):
    __slots__ = ("command", "path", "args", "env", "timeoutSeconds", "limits", "secretArgs", "requestKey")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    TIMEOUTSECONDS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SECRETARGS_FIELD_NUMBER: _ClassVar[int]
    REQUESTKEY_FIELD_NUMBER: _ClassVar[int]
    command: str
    path: str
    args: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    timeoutSeconds: int
    limits: Limits
    secretArgs: _containers.RepeatedScalarFieldContainer[int]
    requestKey: str
    def __init__(self, command: _Optional[str] = ..., path: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., timeoutSeconds: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., secretArgs: _Optional[_Iterable[int]] = ..., requestKey: _Optional[str] = ...) -> None: ...

class StartJobRes(_message.Message):
    __slots__ = ("jobID", "requestKey", "existing")
    JOBID_FIELD_NUMBER: _ClassVar[int]
    REQUESTKEY_FIELD_NUMBER: _ClassVar[int]
    EXISTING_FIELD_NUMBER: _ClassVar[int]
    jobID: str
    requestKey: str
    existing: bool
    def __init__(self, jobID: _Optional[str] = ..., requestKey: _Optional[str] = ..., existing: _Optional[bool] = ...) -> None: ...

class StopJobReq(_message.Message):
    __slots__ = ("jobID",)
    JOBID_FIELD_NUMBER: _ClassVar[int]
    jobID: str
    def __init__(self, jobID: _Optional[str] = ...) -> None: ...

class StopJobRes(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QueryJobReq(_message.Message):
    __slots__ = ("jobID",)
    JOBID_FIELD_NUMBER: _ClassVar[int]
    jobID: str
    def __init__(self, jobID: _Optional[str] = ...) -> None: ...

class Rusage(_message.Message):
    __slots__ = ("userCpuSeconds", "systemCpuSeconds", "maxRssBytes")
    USERCPUSECONDS_FIELD_NUMBER: _ClassVar[int]
    SYSTEMCPUSECONDS_FIELD_NUMBER: _ClassVar[int]
    MAXRSSBYTES_FIELD_NUMBER: _ClassVar[int]
    userCpuSeconds: float
    systemCpuSeconds: float
    maxRssBytes: int
    def __init__(self, userCpuSeconds: _Optional[float] = ..., systemCpuSeconds: _Optional[float] = ..., maxRssBytes: _Optional[int] = ...) -> None: ...

class QueryJobRes(_message.Message):
    __slots__ = ("done", "error", "errorText", "state", "exitCode", "signal", "pid", "startTime", "endTime", "jobID", "owner", "command", "path", "args", "rusage", "outputBytes", "outputTruncated", "timeoutSeconds", "requestKey")
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERRORTEXT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXITCODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTTIME_FIELD_NUMBER: _ClassVar[int]
    ENDTIME_FIELD_NUMBER: _ClassVar[int]
    JOBID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    RUSAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTBYTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTTRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TIMEOUTSECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTKEY_FIELD_NUMBER: _ClassVar[int]
    done: bool
    error: bool
    errorText: str
    state: JobState
    exitCode: int
    signal: int
    pid: int
    startTime: _timestamp_pb2.Timestamp
    endTime: _timestamp_pb2.Timestamp
    jobID: str
    owner: str
    command: str
    path: str
    args: _containers.RepeatedScalarFieldContainer[str]
    rusage: Rusage
    outputBytes: int
    outputTruncated: bool
    timeoutSeconds: int
    requestKey: str
    def __init__(self, done: _Optional[bool] = ..., error: _Optional[bool] = ..., errorText: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., exitCode: _Optional[int] = ..., signal: _Optional[int] = ..., pid: _Optional[int] = ..., startTime: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., endTime: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., jobID: _Optional[str] = ..., owner: _Optional[str] = ..., command: _Optional[str] = ..., path: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., rusage: _Optional[_Union[Rusage, _Mapping]] = ..., outputBytes: _Optional[int] = ..., outputTruncated: _Optional[bool] = ..., timeoutSeconds: _Optional[int] = ..., requestKey: _Optional[str] = ...) -> None: ...

class StreamJobOutputReq(_message.Message):
    __slots__ = ("jobID", "offset", "follow", "endStatus")
    JOBID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    ENDSTATUS_FIELD_NUMBER: _ClassVar[int]
    jobID: str
    offset: int
    follow: bool
    endStatus: bool
    def __init__(self, jobID: _Optional[str] = ..., offset: _Optional[int] = ..., follow: _Optional[bool] = ..., endStatus: _Optional[bool] = ...) -> None: ...

class StreamJobOutputRes(_message.Message):
    __slots__ = ("data", "offset", "status", "jobID")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    JOBID_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    status: QueryJobRes
    jobID: str
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., status: _Optional[_Union[QueryJobRes, _Mapping]] = ..., jobID: _Optional[str] = ...) -> None: ...

class ListJobsReq(_message.Message):
    __slots__ = ("states", "owner", "pageSize", "pageToken")
    STATES_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    PAGESIZE_FIELD_NUMBER: _ClassVar[int]
    PAGETOKEN_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[JobState]
    owner: str
    pageSize: int
    pageToken: str
    def __init__(self, states: _Optional[_Iterable[_Union[JobState, str]]] = ..., owner: _Optional[str] = ..., pageSize: _Optional[int] = ..., pageToken: _Optional[str] = ...) -> None: ...

class ListJobsRes(_message.Message):
    __slots__ = ("jobs", "nextPageToken")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXTPAGETOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[QueryJobRes]
    nextPageToken: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[QueryJobRes, _Mapping]]] = ..., nextPageToken: _Optional[str] = ...) -> None: ...

class WaitJobReq(_message.Message):
    __slots__ = ("jobID", "waitMillis")
    JOBID_FIELD_NUMBER: _ClassVar[int]
    WAITMILLIS_FIELD_NUMBER: _ClassVar[int]
    jobID: str
    waitMillis: int
    def __init__(self, jobID: _Optional[str] = ..., waitMillis: _Optional[int] = ...) -> None: ...

class RegisterReq(_message.Message):
    __slots__ = ("address", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    address: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, address: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegisterRes(_message.Message):
    __slots__ = ("success", "workerID", "heartbeatSeconds")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    WORKERID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEATSECONDS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    workerID: str
    heartbeatSeconds: int
    def __init__(self, success: _Optional[bool] = ..., workerID: _Optional[str] = ..., heartbeatSeconds: _Optional[int] = ...) -> None: ...

class DeregisterReq(_message.Message):
    __slots__ = ("workerID",)
    WORKERID_FIELD_NUMBER: _ClassVar[int]
    workerID: str
    def __init__(self, workerID: _Optional[str] = ...) -> None: ...

class DeregisterRes(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class HeartbeatReq(_message.Message):
    __slots__ = ("workerID",)
    WORKERID_FIELD_NUMBER: _ClassVar[int]
    workerID: str
    def __init__(self, workerID: _Optional[str] = ...) -> None: ...

class HeartbeatRes(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class LinkUp(_message.Message):
    __slots__ = ("hello", "heartbeat", "reply")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    hello: LinkHello
    heartbeat: HeartbeatReq
    reply: LinkReply
    def __init__(self, hello: _Optional[_Union[LinkHello, _Mapping]] = ..., heartbeat: _Optional[_Union[HeartbeatReq, _Mapping]] = ..., reply: _Optional[_Union[LinkReply, _Mapping]] = ...) -> None: ...

class LinkHello(_message.Message):
    __slots__ = ("workerID", "acceptsCalls", "maxCalls")
    WORKERID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTSCALLS_FIELD_NUMBER: _ClassVar[int]
    MAXCALLS_FIELD_NUMBER: _ClassVar[int]
    workerID: str
    acceptsCalls: bool
    maxCalls: int
    def __init__(self, workerID: _Optional[str] = ..., acceptsCalls: _Optional[bool] = ..., maxCalls: _Optional[int] = ...) -> None: ...

class LinkDown(_message.Message):
    __slots__ = ("heartbeat", "call", "cancel")
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    heartbeat: HeartbeatRes
    call: LinkCall
    cancel: LinkCancel
    def __init__(self, heartbeat: _Optional[_Union[HeartbeatRes, _Mapping]] = ..., call: _Optional[_Union[LinkCall, _Mapping]] = ..., cancel: _Optional[_Union[LinkCancel, _Mapping]] = ...) -> None: ...

class LinkCall(_message.Message):
    __slots__ = ("callID", "method", "request", "timeoutMillis")
    CALLID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUTMILLIS_FIELD_NUMBER: _ClassVar[int]
    callID: int
    method: str
    request: bytes
    timeoutMillis: int
    def __init__(self, callID: _Optional[int] = ..., method: _Optional[str] = ..., request: _Optional[bytes] = ..., timeoutMillis: _Optional[int] = ...) -> None: ...

class LinkCancel(_message.Message):
    __slots__ = ("callID",)
    CALLID_FIELD_NUMBER: _ClassVar[int]
    callID: int
    def __init__(self, callID: _Optional[int] = ...) -> None: ...

class LinkReply(_message.Message):
    __slots__ = ("callID", "response", "last", "code", "details")
    CALLID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    callID: int
    response: bytes
    last: bool
    code: int
    details: str
    def __init__(self, callID: _Optional[int] = ..., response: _Optional[bytes] = ..., last: _Optional[bool] = ..., code: _Optional[int] = ..., details: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("workerID", "address", "identity", "registeredAt", "lastSeen", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKERID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    REGISTEREDAT_FIELD_NUMBER: _ClassVar[int]
    LASTSEEN_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    workerID: str
    address: str
    identity: str
    registeredAt: _timestamp_pb2.Timestamp
    lastSeen: _timestamp_pb2.Timestamp
    labels: _containers.ScalarMap[str, str]
    def __init__(self, workerID: _Optional[str] = ..., address: _Optional[str] = ..., identity: _Optional[str] = ..., registeredAt: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lastSeen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListWorkersReq(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersRes(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class DispatchStartJobReq(_message.Message):
    __slots__ = ("workerID", "job")
    WORKERID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    workerID: str
    job: StartJobReq
    def __init__(self, workerID: _Optional[str] = ..., job: _Optional[_Union[StartJobReq, _Mapping]] = ...) -> None: ...

class DispatchJobReq(_message.Message):
    __slots__ = ("workerID", "jobID")
    WORKERID_FIELD_NUMBER: _ClassVar[int]
    JOBID_FIELD_NUMBER: _ClassVar[int]
    workerID: str
    jobID: str
    def __init__(self, workerID: _Optional[str] = ..., jobID: _Optional[str] = ...) -> None: ...

class TargetSelector(_message.Message):
    __slots__ = ("identityPattern", "labels", "workers")
    IDENTITYPATTERN_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    identityPattern: str
    labels: LabelSelector
    workers: WorkerList
    def __init__(self, identityPattern: _Optional[str] = ..., labels: _Optional[_Union[LabelSelector, _Mapping]] = ..., workers: _Optional[_Union[WorkerList, _Mapping]] = ...) -> None: ...

class LabelSelector(_message.Message):
    __slots__ = ("match",)
    class MatchEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MATCH_FIELD_NUMBER: _ClassVar[int]
    match: _containers.ScalarMap[str, str]
    def __init__(self, match: _Optional[_Mapping[str, str]] = ...) -> None: ...

class WorkerList(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class Quantity(_message.Message):
    __slots__ = ("count", "percent")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    count: int
    percent: int
    def __init__(self, count: _Optional[int] = ..., percent: _Optional[int] = ...) -> None: ...

class StartRunReq(_message.Message):
    __slots__ = ("job", "targets", "maxConcurrency", "maxErrors")
    JOB_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    MAXCONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    MAXERRORS_FIELD_NUMBER: _ClassVar[int]
    job: StartJobReq
    targets: TargetSelector
    maxConcurrency: Quantity
    maxErrors: Quantity
    def __init__(self, job: _Optional[_Union[StartJobReq, _Mapping]] = ..., targets: _Optional[_Union[TargetSelector, _Mapping]] = ..., maxConcurrency: _Optional[_Union[Quantity, _Mapping]] = ..., maxErrors: _Optional[_Union[Quantity, _Mapping]] = ...) -> None: ...

class RunHost(_message.Message):
    __slots__ = ("workerID", "address", "identity", "state", "jobID", "exitCode", "errorText", "startTime", "endTime")
    WORKERID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    JOBID_FIELD_NUMBER: _ClassVar[int]
    EXITCODE_FIELD_NUMBER: _ClassVar[int]
    ERRORTEXT_FIELD_NUMBER: _ClassVar[int]
    STARTTIME_FIELD_NUMBER: _ClassVar[int]
    ENDTIME_FIELD_NUMBER: _ClassVar[int]
    workerID: str
    address: str
    identity: str
    state: HostState
    jobID: str
    exitCode: int
    errorText: str
    startTime: _timestamp_pb2.Timestamp
    endTime: _timestamp_pb2.Timestamp
    def __init__(self, workerID: _Optional[str] = ..., address: _Optional[str] = ..., identity: _Optional[str] = ..., state: _Optional[_Union[HostState, str]] = ..., jobID: _Optional[str] = ..., exitCode: _Optional[int] = ..., errorText: _Optional[str] = ..., startTime: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., endTime: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("succeeded", "failed", "notStarted", "unreachable", "unknown", "pending")
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    NOTSTARTED_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    succeeded: int
    failed: int
    notStarted: int
    unreachable: int
    unknown: int
    pending: int
    def __init__(self, succeeded: _Optional[int] = ..., failed: _Optional[int] = ..., notStarted: _Optional[int] = ..., unreachable: _Optional[int] = ..., unknown: _Optional[int] = ..., pending: _Optional[int] = ...) -> None: ...

class RunInfo(_message.Message):
    __slots__ = ("runID", "owner", "state", "job", "targets", "maxConcurrency", "maxErrors", "createdAt", "endTime", "hosts", "summary")
    RUNID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    MAXCONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    MAXERRORS_FIELD_NUMBER: _ClassVar[int]
    CREATEDAT_FIELD_NUMBER: _ClassVar[int]
    ENDTIME_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    runID: str
    owner: str
    state: RunState
    job: StartJobReq
    targets: TargetSelector
    maxConcurrency: int
    maxErrors: int
    createdAt: _timestamp_pb2.Timestamp
    endTime: _timestamp_pb2.Timestamp
    hosts: _containers.RepeatedCompositeFieldContainer[RunHost]
    summary: RunSummary
    def __init__(self, runID: _Optional[str] = ..., owner: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., job: _Optional[_Union[StartJobReq, _Mapping]] = ..., targets: _Optional[_Union[TargetSelector, _Mapping]] = ..., maxConcurrency: _Optional[int] = ..., maxErrors: _Optional[int] = ..., createdAt: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., endTime: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., hosts: _Optional[_Iterable[_Union[RunHost, _Mapping]]] = ..., summary: _Optional[_Union[RunSummary, _Mapping]] = ...) -> None: ...

class RunReq(_message.Message):
    __slots__ = ("runID", "batch")
    RUNID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    runID: str
    batch: bool
    def __init__(self, runID: _Optional[str] = ..., batch: _Optional[bool] = ...) -> None: ...

class RunOutput(_message.Message):
    __slots__ = ("workerID", "host", "line")
    WORKERID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    workerID: str
    host: str
    line: bytes
    def __init__(self, workerID: _Optional[str] = ..., host: _Optional[str] = ..., line: _Optional[bytes] = ...) -> None: ...

class RunEvent(_message.Message):
    __slots__ = ("output", "host", "done", "batch")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    output: RunOutput
    host: RunHost
    done: RunInfo
    batch: RunEvents
    def __init__(self, output: _Optional[_Union[RunOutput, _Mapping]] = ..., host: _Optional[_Union[RunHost, _Mapping]] = ..., done: _Optional[_Union[RunInfo, _Mapping]] = ..., batch: _Optional[_Union[RunEvents, _Mapping]] = ...) -> None: ...

class RunEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[RunEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[RunEvent, _Mapping]]] = ...) -> None: ...

class ListRunsReq(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListRunsRes(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunInfo]
    def __init__(self, runs: _Optional[_Iterable[_Union[RunInfo, _Mapping]]] = ...) -> None: ...
