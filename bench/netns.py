"""Load generators on the far side of a veth pair: a named network namespace for the clients (needs root).

On loopback a send runs the *receiving* socket's TCP input and its epoll wakeup in the sender's context
(the softirq on the way out of the syscall), so a server's CPU figures carry its clients' receive work.
:class:`VethNamespace` puts the clients in a namespace of their own, joined to the host by a veth pair
whose two ends each receive in a NAPI thread of their own (GRO on, ``threaded``): the clients' end's
thread pinned to the clients' core, the server's end's to the server's core. A send then queues the packet
on the other end's ring and wakes its thread only when that thread sleeps (as a NIC coalesces interrupts),
and neither end's receive work is charged to the process that sent: the server's own input (its clients'
ACKs) runs in its end's thread, whose CPU :attr:`VethNamespace.server_rx_pid` lets a bench add.

RPS (``rps_cpus``) was tried first and is not used: it steers per packet with an inter-processor interrupt
raised from the sender's context, and on this virtual machine that IPI (a trapped MSR write) was a quarter
of the server's samples, a cost a NIC does not have.

:func:`enter` moves the calling process (a load-generator worker, before it opens any socket) into the
namespace; :func:`net_rx` reads the ``NET_RX`` softirq count per CPU (``/proc/softirqs``), the check that
the steering happened.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from types import TracebackType

#: ``CLONE_NEWNET`` of <sched.h> (``os.setns`` is Python 3.12+)
_CLONE_NEWNET = 0x40000000
#: <linux/sockios.h>, <linux/ethtool.h>
_SIOCETHTOOL, _ETHTOOL_STSO, _ETHTOOL_SGRO = 0x8946, 0x1F, 0x2C


@dataclass(frozen=True)
class ClientNet:
    """What a load-generator worker needs to run in the namespace: its name, the server's address as seen
    from inside, and the client source addresses to spread connections over (ephemeral ports per address)."""

    namespace: str
    server: str
    sources: tuple[str, ...]
    #: the server end's NAPI thread (its CPU is the server's own receive work)
    server_rx_pid: int = 0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _ethtool(dev: str, command: int, on: bool) -> None:
    """One ``ethtool -K`` flag of ``dev`` through SIOCETHTOOL (no ethtool binary needed)."""
    value = ctypes.create_string_buffer(struct.pack("II", command, int(on)), 8)
    request = struct.pack("16sP", dev.encode(), ctypes.addressof(value)) + bytes(16)
    with socket.socket() as s:
        fcntl.ioctl(s, _SIOCETHTOOL, request)


#: packets a veth end's queue holds (see :func:`_tc_queue`)
QUEUE_PACKETS = 100_000


def _tc_queue(dev: str, namespace: str | None = None) -> None:
    """A queue (``pfifo``) in front of ``dev``, as a NIC's driver has one in front of its transmit ring. A veth
    has none (``noqueue``): a send that finds the other end's ring (256 packets) full is dropped, so a fan-out
    to 18,000 sockets lost a fifth of its segments and paid for them again after the retransmit timeout,
    where a NIC's queue waits and its ring drains at line rate. With a queue, a full ring stops the veth's
    transmit queue until the other end's NAPI thread has room, and nothing is dropped: on kernels with the
    veth's backpressure (Linux 6.16 and later; before it, a full ring still drops). Each fan-out row of
    ``bench_rooms`` reports the retransmits that would show it."""
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    subprocess.run([*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "pfifo", "limit", str(QUEUE_PACKETS)],
                   check=True, capture_output=True)


def _napi_thread(dev: str) -> int:
    """The pid of ``dev``'s NAPI kernel thread (``napi/<dev>-<id>``)."""
    prefix = f"napi/{dev}-"
    for _ in range(50):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/comm") as f:
                        if f.read().startswith(prefix):
                            return int(entry)
                except OSError:
                    continue
        time.sleep(0.1)
    raise RuntimeError(f"no NAPI thread for {dev}")


class VethNamespace:
    """``ip netns add``, a veth pair ``host`` (``10.<subnet>.0.1/16``, root namespace) -- ``peer`` (in the
    namespace, with ``sources`` addresses ``10.<subnet>.0.2``...), each end receiving in a NAPI thread: the
    peer's pinned to ``client_cpu``, the host end's to ``server_cpu``. Removed (with its veth) on exit."""

    def __init__(self, name: str, *, server_cpu: int, client_cpu: int, sources: int = 8, subnet: int = 203) -> None:
        self.name = name
        self.host_if, self.peer_if = f"{name[:10]}-h", f"{name[:10]}-p"
        self.server_cpu, self.client_cpu = server_cpu, client_cpu
        self.server = f"10.{subnet}.0.1"
        self.sources = tuple(f"10.{subnet}.0.{i}" for i in range(2, 2 + sources))
        #: the host end's NAPI thread: the server's own receive work (its clients' ACKs), on the server's core
        self.server_rx_pid = 0
        self.client_rx_pid = 0

    @property
    def client_net(self) -> ClientNet:
        return ClientNet(self.name, self.server, self.sources, self.server_rx_pid)

    def __enter__(self) -> VethNamespace:
        reap_stale(self.name.rstrip("0123456789"))
        held = subprocess.run(["ip", "-4", "-o", "addr", "show", "to", f"{self.server}/32"], capture_output=True,
                              text=True).stdout.strip()
        if held:  # a second run at once would route the same subnet twice: its clients' traffic crosses
            raise RuntimeError(f"{self.server} is held by another run's veth ({held.split()[1]}): one run at a time")
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
            for dev in (self.host_if, self.peer_if):  # the flags stay with the peer in its namespace
                # GRO gives a veth end its NAPI; a TCP packet goes through it only when the sending end has no
                # TSO (else veth_xmit takes it in the sender's context, as loopback does)
                _ethtool(dev, _ETHTOOL_SGRO, True)
                _ethtool(dev, _ETHTOOL_STSO, False)
            _ip("link", "set", self.peer_if, "netns", self.name)
            _ip("addr", "add", f"{self.server}/16", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _tc_queue(self.host_if)
            with open(f"/sys/class/net/{self.host_if}/threaded", "w") as f:
                f.write("1\n")
            inside = ("netns", "exec", self.name, "ip")
            _ip(*inside, "link", "set", "lo", "up")
            for addr in self.sources:
                _ip(*inside, "addr", "add", f"{addr}/16", "dev", self.peer_if)
            _ip(*inside, "link", "set", self.peer_if, "up")
            _tc_queue(self.peer_if, self.name)
            # the peer's sysfs is the namespace's: written from a process inside
            subprocess.run(["ip", "netns", "exec", self.name, "sh", "-c",
                            f"echo 1 > /sys/class/net/{self.peer_if}/threaded"], check=True, capture_output=True)
            self.server_rx_pid, self.client_rx_pid = _napi_thread(self.host_if), _napi_thread(self.peer_if)
            os.sched_setaffinity(self.server_rx_pid, {self.server_cpu})
            os.sched_setaffinity(self.client_rx_pid, {self.client_cpu})
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        # the veth pair goes with its namespace end; the host end is deleted explicitly in case it was left alone
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def reap_stale(prefix: str) -> None:
    """Remove the namespaces ``<prefix><pid>`` (and their veth) of runs whose process is gone: a run killed
    with SIGKILL (a test's timeout) cannot remove its own, and its subnet would stay routed."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
    for name in (line.split()[0] for line in listed if line.strip()):
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["ip", "link", "del", f"{name[:10]}-h"], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def enter(namespace: str) -> None:
    """Move the calling process into the named namespace (``/run/netns/<namespace>``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)


def net_rx() -> list[int]:
    """The ``NET_RX`` softirqs handled so far, per CPU."""
    with open("/proc/softirqs") as f:
        for line in f:
            name, _, counts = line.partition(":")
            if name.strip() == "NET_RX":
                return [int(x) for x in counts.split()]
    return []


def tcp_retransmits() -> int:
    """TCP segments this network namespace has retransmitted so far (``RetransSegs`` of /proc/net/snmp): a
    fan-out that overflows a queue on the way pays for its sends twice, and its latency is the RTO's."""
    with open("/proc/net/snmp") as f:
        names, values = (line.split() for line in f if line.startswith("Tcp:"))
    return int(values[names.index("RetransSegs")])


def softirq_seconds() -> list[float]:
    """Seconds each CPU has spent in softirqs so far (``/proc/stat``, the 7th field of its ``cpuN`` line)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        return [int(line.split()[7]) / tick for line in f if line.startswith("cpu") and line[3].isdigit()]


#: kernel functions looked for in a server's call chains: ``tcp_v4_rcv`` is all TCP input (the server's own
#: ACKs too); the others are its clients' receive work in a fan-out (a data segment queued on a receiving
#: socket, the reader woken, its epoll woken), as the server's own input there is ACKs
CLIENT_SIDE = ("tcp_v4_rcv", "tcp_data_queue", "sock_def_readable", "ep_poll_callback")
#: of those, the clients' receive work proper
CLIENT_RECEIVE = ("tcp_data_queue", "sock_def_readable")


def perf_record(pid: int, path: str, freq: int = 499) -> subprocess.Popen[bytes]:
    """``perf record`` of process ``pid`` at ``freq`` samples per CPU-second, with kernel call chains (stopped
    by SIGINT, then wait)."""
    return subprocess.Popen(["perf", "record", "-F", str(freq), "-g", "-p", str(pid), "-o", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def perf_shares(path: str) -> dict[str, float | int]:
    """Of a ``perf record`` file's samples: how many, the share in the kernel, per :data:`CLIENT_SIDE`
    function the share whose call chain holds it, and ``client_receive``: the share with either of the clients'
    receive functions (a data segment queued, its reader woken; one sample often holds both)."""
    text = subprocess.run(["perf", "script", "-i", path], capture_output=True, text=True).stdout
    samples = [s for s in text.split("\n\n") if s.strip()]
    out: dict[str, float | int] = {"samples": len(samples)}
    if samples:
        out["kernel"] = round(sum("[kernel.kallsyms]" in s.split("\n", 2)[1] for s in samples
                                  if s.count("\n") >= 1) / len(samples), 3)
        for fn in CLIENT_SIDE:
            out[fn] = round(sum(f" {fn}+" in s for s in samples) / len(samples), 3)
        out["client_receive"] = round(sum(any(f" {fn}+" in s for fn in CLIENT_RECEIVE) for s in samples)
                                      / len(samples), 3)
    return out
