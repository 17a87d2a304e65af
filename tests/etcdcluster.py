"""A real etcd cluster for the tests: members on loopback ports, mTLS everywhere.

Uses Debian's ``etcd`` (package ``etcd-server``, installed by scripts/test.sh)
and the etcd certificates of scripts/gen_certs.sh (its own CA). Each member
has its own data folder in the test's temporary folder; ``stop`` kills them all.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import grpc

from helpers import Certs, free_port, wait_for

__all__ = ["ETCD", "EtcdCluster"]

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


class EtcdCluster:
    """``n`` etcd members on 127.0.0.1, client and peer traffic over mTLS."""

    def __init__(self, workdir: Path, certs: Certs, n: int = 3) -> None:
        self.workdir = workdir
        self.certs = certs
        self.names = [f"m{i}" for i in range(n)]
        self.client_ports = {m: free_port() for m in self.names}
        self.peer_ports = {m: free_port() for m in self.names}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{self.client_ports[m]}" for m in self.names]

    def _argv(self, m: str) -> list[str]:
        c = self.certs
        cluster = ",".join(f"{n}=https://127.0.0.1:{self.peer_ports[n]}" for n in self.names)
        client = f"https://127.0.0.1:{self.client_ports[m]}"
        peer = f"https://127.0.0.1:{self.peer_ports[m]}"
        return [
            ETCD,
            f"--name={m}",
            f"--data-dir={self.workdir / m}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={cluster}",
            "--initial-cluster-state=new",
            "--initial-cluster-token=agent-tests",
            "--client-cert-auth",
            f"--trusted-ca-file={c.crt('etcd-ca')}",
            f"--cert-file={c.crt('etcd-server')}",
            f"--key-file={c.key('etcd-server')}",
            "--peer-client-cert-auth",
            f"--peer-trusted-ca-file={c.crt('etcd-ca')}",
            f"--peer-cert-file={c.crt('etcd-peer')}",
            f"--peer-key-file={c.key('etcd-peer')}",
            "--heartbeat-interval=100",
            "--election-timeout=1000",
            "--logger=zap",
            "--log-level=warn",
        ]

    def start_member(self, m: str) -> None:
        log = open(self.workdir / f"{m}.log", "ab")  # noqa: SIM115
        self.procs[m] = subprocess.Popen(
            self._argv(m), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for m in self.names:
            self.start_member(m)
        wait_for(self.healthy, timeout, interval=0.2)
        return self

    def healthy(self) -> bool:
        """Every running member answers a read (a quorum exists)."""
        from aetcd import rpc  # type: ignore[import-untyped,unused-ignore]

        c = self.certs
        creds = grpc.ssl_channel_credentials(
            c.crt("etcd-ca").read_bytes(),
            c.key("etcd-client").read_bytes(),
            c.crt("etcd-client").read_bytes(),
        )
        for m, p in self.procs.items():
            if p.poll() is not None:
                continue
            with grpc.secure_channel(f"127.0.0.1:{self.client_ports[m]}", creds) as ch:
                try:
                    rpc.KVStub(ch).Range(rpc.RangeRequest(key=b"/health"), timeout=2)
                except grpc.RpcError:
                    return False
        return True

    def kill(self, m: str) -> None:
        p = self.procs[m]
        p.send_signal(signal.SIGKILL)
        p.wait()

    def log(self, m: str) -> str:
        return (self.workdir / f"{m}.log").read_text(errors="replace")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            p.wait(max(0.1, deadline - time.monotonic()))
