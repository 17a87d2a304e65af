"""The job keeper: a program of its own beside the agent (``agent keeper``).

Its process, its protocol, its decision of every start, the vfork path, cgroups,
Landlock, seccomp and the job users. One-way: nothing here imports the agent
(the ``daemon`` package), grpc, the client or the scheduler (tests/test_imports.py);
the agent imports the keeper's side of their protocol from here.
"""
