"""Where the room streams' leaders sit (``room_streams`` > 1 on a cluster, ``replicas`` > 1): a part of
:class:`~wirehub.builtins.bus.nats_bus.NatsBus`.

Each room stream has a leader that orders its publishes; JetStream elects it where it may, possibly every
stream's on one node, and when a node dies its streams' leaders move to the survivors and stay there after
it returns. So the leaders are spread over the nodes (a stream whose leader's node leads more than its
share, ``ceil(room_streams / nodes)``, is asked to step down to the node that leads fewest:
``STREAM.LEADER.STEPDOWN`` with a preferred server, nats-server 2.11+):

- when a replica connects (after a random wait up to :data:`SPREAD_JITTER`), at once;
- and from the upkeep, on the install's **check**: about every :data:`CHECK_INTERVAL` seconds one replica (the
  one that records the check in the state bucket's key :data:`CHECK_KEY`, compare-and-set) reads every room
  stream's leader. Leaders move only when :data:`CHECKS_TO_MOVE` checks in a row found a node leading more than
  its share, so a node that returns and dies again (a flapping node) causes no elections; the verdicts in a row
  are kept in the key, so they count whichever replica checks.

Each election stalls the stream's publishes and makes every replica read its rooms again, so one replica at a
time moves leaders: the one that holds the claim :data:`SPREAD_KEY` in the state bucket (:meth:`claim`). It
reads each stream again just before asking it to step down (skipped where another move balanced it
meanwhile) and asks each stream at most once per spread.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from wirehub import BusUnavailable
from wirehub.builtins.bus.nats_acks import AckRefused, Acks

if TYPE_CHECKING:
    from wirehub.builtins.bus.nats_bus import NatsBus

log = logging.getLogger("wirehub.bus.nats")

#: seconds a replica waits (at random up to) after connecting before it spreads the room streams' leaders
SPREAD_JITTER = 1.0
#: the state bucket's key of the claim to spread them ("." is never base64url: never a room's key), and the
#: seconds after which a claim whose replica never released it lapses
SPREAD_KEY = "spread.leaders"
SPREAD_CLAIM = 30.0
#: seconds between the install's checks of the leaders' placement (whichever replica's upkeep comes first);
#: a returned node leads its share again CHECKS_TO_MOVE checks after it caught up, 1-3 minutes
CHECK_INTERVAL = 60.0
#: the state bucket's key of the last check: ``b"<time.time()> <checks in a row that found a node over its share>"``
CHECK_KEY = "spread.checked"
#: checks in a row that must find a node over its share before leaders move (hysteresis: not on one look)
CHECKS_TO_MOVE = 2


class Leaders:
    """The bus's leader placement: :meth:`connected` at each connect, :meth:`upkeep` from the bus's upkeep.

    ``interval`` (:data:`CHECK_INTERVAL`) is the install's cadence of checks; tests make it short."""

    def __init__(self, bus: NatsBus, interval: float | None = None) -> None:
        self.bus = bus
        self.interval = CHECK_INTERVAL if interval is None else interval
        #: time.monotonic() of this replica's next look at the check key (0: at its first upkeep)
        self._next = 0.0
        self._task: asyncio.Task[None] | None = None
        #: counters for tests and operators: checks this replica made (it read the leaders), and the
        #: step-downs it asked for
        self.checks = 0
        self.moved = 0

    @property
    def _errors(self) -> tuple[type[BaseException], ...]:
        """What a KV or API request may raise when the connection or the cluster is in trouble."""
        nats = self.bus.nats
        return (AckRefused, BusUnavailable, nats.errors.Error, nats.js.errors.Error, TimeoutError, ConnectionError,
                KeyError, TypeError, ValueError)

    def _wanted(self) -> bool:
        return self.bus.opts.replicas > 1 and len(self.bus.streams) > 1

    def _background(self, coro: Any) -> asyncio.Task[None]:
        """A task beside the connection's work, cancelled with the connection (the bus's ``_tasks``)."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        tasks = self.bus._tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    # -- at connect ------------------------------------------------------------------------------------

    def connected(self, acks: Acks) -> None:
        """A new connection: spread the leaders beside its start (which does not wait)."""
        if self._wanted():
            self._background(self.spread_leaders(acks))

    async def spread_leaders(self, acks: Acks) -> None:
        """After a random wait (:data:`SPREAD_JITTER`: replicas connecting together, a rolling update or a
        mass reconnect, do not all read at once), spread the leaders while this replica holds the claim."""
        await asyncio.sleep(random.uniform(0, SPREAD_JITTER))
        await self._claimed_spread(acks)

    async def _claimed_spread(self, acks: Acks) -> None:
        kv = self.bus.state_kv
        if kv is None or self.bus.acks is not acks:
            return
        nats = self.bus.nats
        try:
            claim = await self.claim(kv)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, ConnectionError, ValueError) as exc:
            log.info("room stream leaders not spread (the claim failed): %s: %s", type(exc).__name__, exc)
            return
        if claim is None:
            log.info("room stream leaders: another replica is spreading them")
            return
        try:
            await self.spread(acks)
        # the connection may be replaced while this runs in the background (nats-py's errors are not
        # ConnectionError): it ends with a log line, never as a task's unretrieved exception
        except self._errors as exc:
            log.info("room stream leaders not spread: %s: %s", type(exc).__name__, exc)
        finally:
            try:  # only our own claim: a stale one may have been taken over by another replica meanwhile
                await kv.delete(SPREAD_KEY, last=claim)
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError, ConnectionError) as exc:
                log.info("room stream leaders: the claim was not released (it lapses in %gs): %s",
                         SPREAD_CLAIM, exc)

    async def claim(self, kv: Any) -> int | None:
        """The revision of this replica's claim when it may spread the leaders now (the key was absent, or
        its writer's claim is older than :data:`SPREAD_CLAIM`: that replica died while spreading); None when
        another replica holds it."""
        jerr = self.bus.nats.js.errors
        now = f"{time.time():.3f}".encode()
        try:
            return int(await kv.create(SPREAD_KEY, now))
        except jerr.KeyWrongLastSequenceError:
            pass
        try:
            entry = await kv.get(SPREAD_KEY)
        except (jerr.KeyNotFoundError, jerr.KeyDeletedError):
            return None  # released just now: its holder spread them
        if time.time() - float(entry.value or b"0") < SPREAD_CLAIM:
            return None
        try:
            return int(await kv.update(SPREAD_KEY, now, last=entry.revision))
        except jerr.KeyWrongLastSequenceError:
            return None  # another replica took the stale claim first

    async def _read(self, acks: Acks, name: str, leaders: dict[str, str], peers: dict[str, list[str]]) -> None:
        """Stream ``name``'s leader and its current (caught-up) followers, into ``leaders`` and ``peers``; a
        stream without a leader (an election under way) is left out."""
        cluster = (await acks.request(f"$JS.API.STREAM.INFO.{name}", b"")).get("cluster") or {}
        if cluster.get("leader"):
            leaders[name] = cluster["leader"]
            peers[name] = [p["name"] for p in cluster.get("replicas") or [] if p.get("current")]
        else:
            leaders.pop(name, None)
            peers.pop(name, None)

    async def _snapshot(self, acks: Acks) -> tuple[dict[str, str], dict[str, list[str]], int]:
        """Every room stream's leader and current followers, and the share of the nodes they name
        (``ceil(streams / nodes)``; 0 when no stream has a leader)."""
        leaders: dict[str, str] = {}
        peers: dict[str, list[str]] = {}
        for rs in self.bus.streams:
            await self._read(acks, rs.name, leaders, peers)
        nodes = {n for name in leaders for n in (leaders[name], *peers[name])}
        share = -(-len(self.bus.streams) // len(nodes)) if nodes else 0
        return leaders, peers, share

    async def spread(self, acks: Acks) -> None:
        """Ask each stream whose leader's node leads more than its share to step down to the current
        follower that leads fewest (while that one leads less than its share)."""
        leaders, peers, share = await self._snapshot(acks)
        if not share:
            return
        count = collections.Counter(leaders.values())
        for name in sorted(leaders):
            if count[leaders[name]] <= share:
                continue
            was = leaders[name]
            await self._read(acks, name, leaders, peers)  # now: another replica or an election may have moved it
            leader = leaders.get(name)
            if leader is None:
                count[was] -= 1
                continue
            if leader != was:
                count[was] -= 1
                count[leader] += 1
                if count[leader] <= share:
                    continue
            target = min(peers[name], key=lambda n: (count[n], n), default=None)
            if target is None or count[target] >= share:
                continue
            await acks.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{name}",
                               json.dumps({"placement": {"preferred": target}}).encode())
            self.moved += 1
            count[leader] -= 1
            count[target] += 1
            log.info("stream %s: leader moved from %s to %s (room streams spread over the nodes)",
                     name, leader, target)

    # -- from the upkeep -------------------------------------------------------------------------------

    def upkeep(self) -> None:
        """The bus's upkeep: when this replica's look is due (every ``interval / 4`` to ``interval / 2``
        seconds), look at the install's last check beside the upkeep (never delaying its presence heartbeat)."""
        acks = self.bus.acks
        now = time.monotonic()
        if (not self._wanted() or acks is None or now < self._next
                or (self._task is not None and not self._task.done())):
            return
        self._next = now + self.interval * random.uniform(0.25, 0.5)
        self._task = self._background(self._look(acks))

    async def _look(self, acks: Acks) -> None:
        try:
            await self.check(acks)
        except self._errors as exc:
            log.info("room stream leaders not checked: %s: %s", type(exc).__name__, exc)

    async def check(self, acks: Acks, *, force: bool = False) -> bool:
        """The install's check, when the last one is ``interval`` seconds old (or with ``force``): read the
        leaders, record the verdict (checks in a row that found a node over its share) under :data:`CHECK_KEY`
        if no other replica recorded one meanwhile, and at :data:`CHECKS_TO_MOVE` in a row spread them (with
        the claim). True when this replica made the check."""
        kv = self.bus.state_kv
        if kv is None or self.bus.acks is not acks:
            return False
        jerr = self.bus.nats.js.errors
        try:
            entry = await kv.get(CHECK_KEY)
        except (jerr.KeyNotFoundError, jerr.KeyDeletedError):
            entry = None
        at, streak = _parse(entry.value if entry is not None else None)
        now = time.time()
        if at > now + self.interval:
            at, streak = 0.0, 0  # written by a replica whose clock runs ahead: not a check to wait for
        if not force and now - at < self.interval:
            return False  # another replica (or this one) checked lately
        if now - at > 3 * max(self.interval, 1.0):
            streak = 0  # that check is too old to be the one before this one
        self.checks += 1
        leaders, _, share = await self._snapshot(acks)
        count = collections.Counter(leaders.values())
        over = sorted(node for node, n in count.items() if n > share) if share else []
        streak = streak + 1 if over else 0
        # the check that moves leaders starts the count again: a stream whose preferred node never wins its
        # election is asked again only after CHECKS_TO_MOVE more checks, not at every check
        value = b"%.3f %d" % (now, 0 if streak >= CHECKS_TO_MOVE else streak)
        try:
            if entry is None:
                await kv.create(CHECK_KEY, value)
            else:
                await kv.update(CHECK_KEY, value, last=entry.revision)
        except jerr.KeyWrongLastSequenceError:
            return False  # another replica recorded a check meanwhile: its verdict counts, not this one's
        if not over:
            return True
        if streak < CHECKS_TO_MOVE:
            log.info("room stream leaders: %s lead%s more than %d of %d streams (check %d of %d before they move)",
                     ", ".join(over), "s" if len(over) == 1 else "", share, len(self.bus.streams), streak,
                     CHECKS_TO_MOVE)
            return True
        await self._claimed_spread(acks)
        return True


def _parse(value: bytes | None) -> tuple[float, int]:
    """(time, checks in a row over) of a check record; (0, 0) for none or an unreadable one."""
    try:
        at, streak = (value or b"").split()
        return float(at), int(streak)
    except ValueError:
        return 0.0, 0
