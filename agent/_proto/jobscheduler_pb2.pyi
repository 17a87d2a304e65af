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
JOB_STATE_UNSPECIFIED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
STOPPED: JobState
TIMED_OUT: JobState
LOST: JobState

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
    __slots__ = ("command", "path", "args", "env", "timeoutSeconds", "limits", "secretArgs")
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
    command: str
    path: str
    args: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    timeoutSeconds: int
    limits: Limits
    secretArgs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, command: _Optional[str] = ..., path: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., timeoutSeconds: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., secretArgs: _Optional[_Iterable[int]] = ...) -> None: ...

class StartJobRes(_message.Message):
    __slots__ = ("jobID",)
    JOBID_FIELD_NUMBER: _ClassVar[int]
    jobID: str
    def __init__(self, jobID: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("done", "error", "errorText", "state", "exitCode", "signal", "pid", "startTime", "endTime", "jobID", "owner", "command", "path", "args", "rusage", "outputBytes", "outputTruncated", "timeoutSeconds")
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
    def __init__(self, done: _Optional[bool] = ..., error: _Optional[bool] = ..., errorText: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., exitCode: _Optional[int] = ..., signal: _Optional[int] = ..., pid: _Optional[int] = ..., startTime: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., endTime: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., jobID: _Optional[str] = ..., owner: _Optional[str] = ..., command: _Optional[str] = ..., path: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., rusage: _Optional[_Union[Rusage, _Mapping]] = ..., outputBytes: _Optional[int] = ..., outputTruncated: _Optional[bool] = ..., timeoutSeconds: _Optional[int] = ...) -> None: ...

class StreamJobOutputReq(_message.Message):
    __slots__ = ("jobID", "offset", "follow")
    JOBID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    jobID: str
    offset: int
    follow: bool
    def __init__(self, jobID: _Optional[str] = ..., offset: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class StreamJobOutputRes(_message.Message):
    __slots__ = ("data", "offset")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

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

class WorkerInfo(_message.Message):
    __slots__ = ("workerID", "address", "identity", "registeredAt", "lastSeen")
    WORKERID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    REGISTEREDAT_FIELD_NUMBER: _ClassVar[int]
    LASTSEEN_FIELD_NUMBER: _ClassVar[int]
    workerID: str
    address: str
    identity: str
    registeredAt: _timestamp_pb2.Timestamp
    lastSeen: _timestamp_pb2.Timestamp
    def __init__(self, workerID: _Optional[str] = ..., address: _Optional[str] = ..., identity: _Optional[str] = ..., registeredAt: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lastSeen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

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
