"""NATS layouts for tests and benchmarks: a 3-node JetStream cluster, a TLS / password-protected server,
and the test certificates they use.

- :class:`NatsNode`: one ``nats-server`` run from a config file it writes (``server_name``, its own
  JetStream store directory, optional cluster block, TLS and authorization), on free ports fixed for its
  life, so a killed node restarts on the same client, route and monitoring ports with its store.
- :class:`NatsCluster`: 3 nodes routed to each other (one cluster name); ready when every node's
  ``/healthz`` says JetStream is current (the meta leader is elected).
- :class:`CertFiles`: a CA, a certificate for 127.0.0.1/localhost (server and client use) and its key,
  generated at test time with ``cryptography``; ``CertFiles()`` again is an unrelated CA.

Kept apart from the Redis layouts (``broker_clusters``) so the two can change independently.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from wirehub.brokers import BrokerError, BrokerProcess, _free_port

__all__ = ["CertFiles", "NatsCluster", "NatsNode"]


class CertFiles:
    """PEM files in a temporary directory: ``ca``; ``cert``/``key`` for localhost and 127.0.0.1."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self._tmp = tempfile.TemporaryDirectory(prefix="wirehub-nats-tls-")
        self.directory = Path(self._tmp.name)
        now = datetime.datetime.now(datetime.UTC)
        valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = name("wirehub nats test CA")
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(valid[0]).not_valid_after(valid[1])
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        sans = x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(valid[0]).not_valid_after(valid[1])
                .add_extension(sans, critical=False).add_extension(usage, critical=False)
                .sign(ca_key, hashes.SHA256()))
        pem = serialization.Encoding.PEM
        self.ca = self._write("ca.pem", ca.public_bytes(pem))
        self.cert = self._write("cert.pem", cert.public_bytes(pem))
        self.key = self._write("key.pem", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        return str(path)

    def close(self) -> None:
        self._tmp.cleanup()


def _quote(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid NATS config string


class NatsNode(BrokerProcess):
    """``nats-server`` from a config file: JetStream in its own store, optional cluster, TLS and auth."""

    binary_name = "nats-server"

    def __init__(self, *, name: str = "", cluster_port: int | None = None, routes: tuple[int, ...] = (),
                 cluster_name: str = "wirehub-test", tls: CertFiles | None = None, verify_clients: bool = False,
                 user: str | None = None, password: str | None = None, token: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name or f"wirehub-test-{self.port}"
        self.monitor_port = _free_port()
        self.cluster_port = cluster_port
        self.routes = routes
        self.cluster_name = cluster_name
        self.tls, self.verify_clients = tls, verify_clients
        self.user, self.password, self.token = user, password, token

    def _reset_ports(self) -> None:
        self.monitor_port = _free_port()

    def config(self) -> str:
        lines = [f"server_name: {_quote(self.name)}", f"listen: \"127.0.0.1:{self.port}\"",
                 f"http: \"127.0.0.1:{self.monitor_port}\"",
                 f"jetstream {{ store_dir: {_quote(str(self.directory / 'jetstream'))} }}"]
        if self.cluster_port is not None:
            routes = ", ".join(f"\"nats-route://127.0.0.1:{p}\"" for p in self.routes if p != self.cluster_port)
            lines.append(f"cluster {{ name: {_quote(self.cluster_name)}, listen: \"127.0.0.1:{self.cluster_port}\", "
                         f"routes: [{routes}] }}")
        if self.tls is not None:
            lines.append(f"tls {{ cert_file: {_quote(self.tls.cert)}, key_file: {_quote(self.tls.key)}, "
                         f"ca_file: {_quote(self.tls.ca)}, verify: {str(self.verify_clients).lower()}, timeout: 5 }}")
        if self.user is not None:
            lines.append(f"authorization {{ user: {_quote(self.user)}, password: {_quote(self.password or '')} }}")
        elif self.token is not None:
            lines.append(f"authorization {{ token: {_quote(self.token)} }}")
        return "\n".join(lines) + "\n"

    def command(self) -> list[str]:
        path = self.directory / "nats.conf"
        path.write_text(self.config())
        return [self.binary, "-c", str(path)]

    def probe(self) -> bool:
        return self.health(js_only=True)

    def health(self, *, js_only: bool = False) -> bool:
        """/healthz: with js_only, JetStream is on; without, it is also current (a cluster has a meta leader)."""
        url = f"http://127.0.0.1:{self.monitor_port}/healthz" + ("?js-enabled-only=true" if js_only else "")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def varz(self) -> dict[str, Any]:
        """The monitoring endpoint /varz (in_msgs, out_msgs, cpu, mem, ...)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/varz", timeout=2.0) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls is not None else 'nats'}://127.0.0.1:{self.port}"

    def restart(self) -> None:
        self.stop()
        self.start()  # same ports (routes name them) and same store


class NatsCluster:
    """Three ``nats-server -js`` nodes in one cluster, each with its own store, name and ports."""

    def __init__(self, size: int = 3, *, name: str = "wirehub-test", startup_timeout: float = 30.0) -> None:
        cluster_ports = tuple(_free_port() for _ in range(size))
        self.nodes = [NatsNode(name=f"n{i + 1}", cluster_port=cluster_ports[i], routes=cluster_ports,
                               cluster_name=name) for i in range(size)]
        self.startup_timeout = startup_timeout

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> None:
        """Start every node and wait until all are healthy; a failed start closes what it started."""
        try:
            for node in self.nodes:  # a node is "ready" (JetStream on) before its peers are up
                node.start()
            self.wait_healthy()
        except BaseException:
            self.close()
            raise

    def wait_healthy(self, nodes: list[NatsNode] | None = None) -> None:
        """Until every running node (or each of ``nodes``) says JetStream is current."""
        deadline = time.monotonic() + self.startup_timeout
        for node in nodes or [n for n in self.nodes if n.running]:
            while not node.health():
                if time.monotonic() > deadline:
                    raise BrokerError(f"{node.name} not healthy: {node.output()[-2000:]}")
                time.sleep(0.1)

    def restore(self) -> None:
        """Start every node that was killed or stopped (same ports and store) and wait until all are
        healthy: the cluster is whole again for the next test."""
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_healthy()

    def varz(self) -> list[dict[str, Any]]:
        out = []
        for node in self.nodes:
            if node.running:
                with contextlib.suppress(OSError, ValueError):
                    out.append(node.varz())
        return out

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
