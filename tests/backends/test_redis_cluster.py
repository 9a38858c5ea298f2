"""The Redis tier on a real Redis Cluster (`DUALWRITE_TEST_REDIS_CLUSTER_URL`, started by
`scripts/services`): a master killed with SIGKILL during sends, a slot moved while it is
watched, and the `redis+cluster://` URL. The contract suite and the send path run on the
cluster too (the `rt-redis-cluster` and `redis-cluster+postgres` parameters of conftest).

Both topology tests turn the cluster feed's safety poll off, so that live delivery afterwards
proves the wake-up subscriptions followed the slot, not that the poll read it anyway. Each
leaves the cluster as `scripts/services` makes it: a killed node is started again (it comes
back as a replica), a moved slot is moved back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.exceptions import ClusterError

import dualwrite.backends.realtime.redis as redis_tier
from dualwrite import DualWrite, SendFailed, Settings, User, open_dualwrite
from dualwrite.backends import BackendContext, create_permanent_store, create_realtime_tier
from dualwrite.errors import BackendUnavailable, BadSetting
from dualwrite.ids import PushIdGenerator
from dualwrite.model import REALTIME_TTL_MS, ChannelRef, LiveEntry, RealtimeMessage
from dualwrite.ports import TokenRequest
from dualwrite.redact import redact_url
from tests.conftest import realtime_url, store_url, unique
from tests.support.wait import until

ADA = User("u1", "Ada")
ROOT = Path(__file__).parents[2]
needs_cluster = pytest.mark.redis_cluster


# -- the URL ---------------------------------------------------------------------------------


def test_a_cluster_url_names_its_seed_nodes() -> None:
    seeds = redis_tier._seeds
    assert seeds("redis+cluster://10.0.0.1:7000,10.0.0.2:7001/0?prefix=app:") == [
        ("10.0.0.1", 7000),
        ("10.0.0.2", 7001),
    ]
    assert seeds("rediss+cluster://user:pw@a.example:6380,[::1]:7000,b.example") == [
        ("a.example", 6380),
        ("::1", 7000),
        ("b.example", 6379),
    ]
    for bad in ("redis+cluster://", "redis+cluster://a:b", "redis+cluster://a:7000,,b:7001"):
        with pytest.raises(BadSetting):
            create_realtime_tier(bad)
    # Its password is masked like any other URL's.
    assert (
        redact_url("redis+cluster://u:secret@a:7000,b:7001")
        == "redis+cluster://u:***@a:7000,b:7001"
    )


async def test_a_cluster_that_cannot_be_reached_is_one_line() -> None:
    tier = create_realtime_tier("redis+cluster://127.0.0.1:1,127.0.0.1:2", BackendContext())
    try:
        with pytest.raises(BackendUnavailable, match="cannot reach Redis Cluster"):
            await tier.connect()
    finally:
        await tier.close()


# -- the cluster, as scripts/services runs it --------------------------------------------------


@dataclass(frozen=True)
class Node:
    id: str
    port: int
    flags: set[str]
    master_id: str
    connected: bool
    slots: list[tuple[int, int]]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags and "fail" not in self.flags


def cli(port: int, *args: object) -> str:
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return done.stdout.strip()


def seed_ports() -> list[int]:
    url = os.environ.get("DUALWRITE_TEST_REDIS_CLUSTER_URL")
    if not url:
        pytest.skip("DUALWRITE_TEST_REDIS_CLUSTER_URL is not set")
    return [port for _, port in redis_tier._seeds(url)]


def cluster_nodes(ports: list[int]) -> list[Node]:
    """`CLUSTER NODES` as the first node that answers sees it."""
    for port in ports:
        with contextlib.suppress(subprocess.SubprocessError):
            text = cli(port, "cluster", "nodes")
            if text:
                break
    else:
        raise AssertionError("no cluster node answers")
    nodes = []
    for line in text.splitlines():
        node_id, address, flags, master, _, _, _, link, *slots = line.split()
        ranges = []
        for item in slots:
            if not item.startswith("["):  # not a slot being migrated
                first, _, last = item.partition("-")
                ranges.append((int(first), int(last or first)))
        nodes.append(
            Node(
                node_id,
                int(address.split("@")[0].rsplit(":", 1)[1]),
                set(flags.replace("myself,", "").split(",")),
                master,
                link == "connected",
                ranges,
            )
        )
    return nodes


def owner(nodes: list[Node], slot: int) -> Node:
    return next(n for n in nodes if any(a <= slot <= b for a, b in n.slots))


def healthy(ports: list[int]) -> bool:
    """3 masters serving every slot, each with a replica in sync, every node connected."""
    try:
        nodes = cluster_nodes(ports)
        if any(not n.connected or "fail" in n.flags for n in nodes):
            return False
        masters = [n for n in nodes if n.is_master and n.slots]
        replicas = [n for n in nodes if "slave" in n.flags]
        if len(masters) != 3 or {r.master_id for r in replicas} != {m.id for m in masters}:
            return False
        for node in nodes:
            if "cluster_state:ok" not in cli(node.port, "cluster", "info"):
                return False
        return all("master_link_status:up" in cli(r.port, "info", "replication") for r in replicas)
    except (subprocess.SubprocessError, StopIteration, ValueError):
        return False


def wait_healthy(ports: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not healthy(ports):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the cluster is not healthy:\n{cli(ports[0], 'cluster', 'nodes')}"
            )
        time.sleep(0.2)


@pytest.fixture
def cluster() -> Iterator[list[int]]:
    """The seed ports of a healthy cluster; healthy again afterwards, whatever the test did
    (`scripts/services` starts any node that does not answer, as it made it)."""
    ports = seed_ports()
    if not healthy(ports):
        subprocess.run(["bash", "scripts/services"], cwd=ROOT, check=True, timeout=180)
        wait_healthy(ports, 60)
    try:
        yield ports
    finally:
        subprocess.run(
            ["bash", "scripts/services"], cwd=ROOT, check=True, timeout=180, capture_output=True
        )
        wait_healthy(ports, 60)


def slot_of(ports: list[int], channel: ChannelRef) -> int:
    # Every key of a channel carries the hash tag {ws/ch}: its slot is the tag's.
    return int(
        cli(ports[0], "cluster", "keyslot", f"{{{channel.workspace_id}/{channel.channel_id}}}")
    )


def channel_on(ports: list[int], node: Node, workspace: str) -> ChannelRef:
    """A channel whose slot ``node`` serves."""
    for i in range(1000):
        channel = ChannelRef(workspace, f"c{i}")
        slot = slot_of(ports, channel)
        if any(first <= slot <= last for first, last in node.slots):
            return channel
    raise AssertionError("no channel found on the node")


@pytest.fixture
def no_safety_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_tier, "_POLL_S", 3600.0)


@contextlib.asynccontextmanager
async def collecting(entries: AsyncIterator[LiveEntry]) -> AsyncIterator[dict[str, float]]:
    """Message ids as they arrive live, with when (each once)."""
    got: dict[str, float] = {}

    async def collect() -> None:
        async for entry in entries:
            got.setdefault(entry.message.message_id, time.monotonic())

    task = asyncio.create_task(collect())
    try:
        yield got
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await entries.aclose()  # type: ignore[attr-defined]


# -- a master killed during sends ------------------------------------------------------------


@dataclass
class Outcome:
    started: float
    message_id: str | None  # None: it failed


@needs_cluster
@pytest.mark.postgres
async def test_a_master_killed_during_sends_fails_its_sends_only_until_failover(
    tmp_path: Path, cluster: list[int], no_safety_poll: None
) -> None:
    """SIGKILL the master of a channel's slot while two channels take sends: a send may fail,
    with the usual "Retry?" error, only within the failover window (until its replica is
    promoted, plus the slot map's refresh); afterwards every send succeeds, nothing
    acknowledged is missing from the permanent store, and live delivery resumes."""
    ports = cluster
    nodes = cluster_nodes(ports)
    masters = [n for n in nodes if n.is_master and n.slots]
    workspace = unique("ws")
    victim = masters[0]
    doomed = channel_on(ports, victim, workspace)
    spared = channel_on(ports, masters[1], workspace)
    doomed_slot = slot_of(ports, doomed)
    postgres = store_url("postgres", tmp_path)
    settings = Settings(
        realtime_url=realtime_url("redis-cluster", tmp_path),
        store_url=postgres,
        queue_path=str(tmp_path / "queue.db"),
        realtime_timeout_s=2.0,
    )
    outcomes: dict[ChannelRef, list[Outcome]] = {doomed: [], spared: []}
    stop = asyncio.Event()

    async def keep_sending(dw: DualWrite, channel: ChannelRef) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            started = time.monotonic()
            try:
                result = await dw.send_message(workspace, channel.channel_id, f"m{i}", ADA)
                outcomes[channel].append(Outcome(started, result.message_id))
            except SendFailed as failed:
                assert str(failed) == "Message failed to send. Retry?"
                outcomes[channel].append(Outcome(started, None))
            await asyncio.sleep(0.02)

    async with open_dualwrite(settings, background=False) as dw:
        live = dw.subscribe(workspace, doomed.channel_id)
        async with collecting(live) as got:
            senders = [asyncio.create_task(keep_sending(dw, c)) for c in outcomes]
            try:
                # Live before the kill: the watch is in place and entries arrive.
                await until(lambda: _count(got, 3), 10)
                pid = int(cli(victim.port, "info", "server").split("process_id:")[1].split()[0])
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                # The failover: another node serves the slot, as master (a few seconds).
                survivors = [n.port for n in nodes if n.port != victim.port]
                await until(lambda: _promoted(survivors, doomed_slot, victim.id), 25)
                promoted = time.monotonic()
                # Slot maps are refreshed on the next error: allow a moment, then every send
                # started later must succeed, and arrive live.
                window_end = promoted + 1.0
                await until(lambda: _succeeded_after(outcomes, window_end + 2.0), 15)
            finally:
                stop.set()
                await asyncio.gather(*senders)
            after = [o for o in outcomes[doomed] if o.started > window_end and o.message_id]
            assert after
            await until(lambda: _arrived(got, after), 10)

        failed = [(c, o.started) for c, os_ in outcomes.items() for o in os_ if not o.message_id]
        assert all(killed <= started <= window_end for _, started in failed), (
            f"sends failed outside the failover window ({killed:.2f} to {window_end:.2f}): {failed}"
        )
        # Nothing acknowledged is missing from the permanent store.
        await dw.retry_all()  # a "pending" answer, if PostgreSQL was slow meanwhile
    store = create_permanent_store(postgres)
    await store.connect()
    try:
        for channel, sent in outcomes.items():
            acknowledged = [o.message_id for o in sent if o.message_id]
            assert acknowledged, f"no send to {channel} succeeded"
            saved = await store.get_many(channel, acknowledged)
            assert sorted(saved) == sorted(acknowledged)
    finally:
        await store.close()


async def _count(got: dict[str, float], at_least: int) -> bool:
    return len(got) >= at_least


async def _arrived(got: dict[str, float], sent: list[Outcome]) -> bool:
    return all(o.message_id in got for o in sent)


async def _promoted(ports: list[int], slot: int, victim_id: str) -> bool:
    with contextlib.suppress(AssertionError, StopIteration):
        serving = owner(await asyncio.to_thread(cluster_nodes, ports), slot)
        return serving.id != victim_id and serving.is_master
    return False


async def _succeeded_after(outcomes: dict[ChannelRef, list[Outcome]], moment: float) -> bool:
    return all(any(o.started > moment and o.message_id for o in sent) for sent in outcomes.values())


# -- a slot moved while watched --------------------------------------------------------------


def move_slot(slot: int, source: Node, target: Node) -> None:
    """What `redis-cli --cluster reshard` does for one slot: IMPORTING/MIGRATING, MIGRATE every
    key, then SETSLOT NODE on both ends."""
    cli(target.port, "cluster", "setslot", slot, "importing", source.id)
    cli(source.port, "cluster", "setslot", slot, "migrating", target.id)
    while keys := cli(source.port, "cluster", "getkeysinslot", slot, 100).split():
        cli(source.port, "migrate", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    for node in (target, source):
        cli(node.port, "cluster", "setslot", slot, "node", target.id)


@needs_cluster
async def test_live_delivery_follows_a_slot_moved_to_another_node(
    tmp_path: Path, cluster: list[int], no_safety_poll: None
) -> None:
    """Resharding moves a watched channel's slot: the server unsubscribes the wake-ups there,
    the feed subscribes on the new owner and reads what it missed; every write arrives, in
    order, with the poll off. (While the slot migrates, a write, which creates its record's
    key, is refused with TRYAGAIN, as Redis Cluster refuses any multi-key command on keys that
    do not exist yet; redis-py retries it for a moment, then it fails: a "Retry?".)"""
    ports = cluster
    masters = [n for n in cluster_nodes(ports) if n.is_master and n.slots]
    source, target = masters[0], masters[1]
    channel = channel_on(ports, source, unique("ws"))
    slot = slot_of(ports, channel)
    tier = create_realtime_tier(realtime_url("redis-cluster", tmp_path), BackendContext())
    await tier.connect()
    feed = tier.live_feed()
    ids = PushIdGenerator()
    moved = False
    try:
        await feed.watch(channel)
        written: list[str] = []
        got: list[str] = []

        async def write(count: int, may_fail: bool = False) -> None:
            for _ in range(count):
                now = int(time.time() * 1000)
                message = RealtimeMessage(
                    ids.new_id(), "u1", "Ada", "t", now, now + REALTIME_TTL_MS
                )
                try:
                    await tier.write(channel, message)
                    written.append(message.message_id)
                except ClusterError:  # TRYAGAIN until redis-py gave up: it did not run
                    assert may_fail
                await asyncio.sleep(0.01)

        async def read() -> bool:
            with contextlib.suppress(TimeoutError):
                entries = await asyncio.wait_for(feed.next_entries(), 0.2)
                got.extend(e.message.message_id for e in entries)
            return [i for i in got if i in written] == written

        await write(5)
        await until(read, 10)
        writing = asyncio.create_task(write(40, may_fail=True))
        await asyncio.to_thread(move_slot, slot, source, target)
        moved = True
        await writing
        await write(5)  # after the move, on the new owner alone
        await until(read, 15)
        assert len(written) > 10
    finally:
        await feed.close()
        await tier.close()
        if moved:
            await asyncio.to_thread(move_slot, slot, target, source)


# -- connections -----------------------------------------------------------------------------


@needs_cluster
async def test_a_burst_beyond_the_connection_limit_waits_its_turn(tmp_path: Path) -> None:
    """As on a single Redis: calls past `max_connections` wait for a connection (within their
    bound) rather than fail, though redis-py's cluster pools refuse past their size."""
    tier = create_realtime_tier(
        realtime_url("redis-cluster", tmp_path) + "&max_connections=4", BackendContext()
    )
    await tier.connect()
    try:
        channel = ChannelRef(unique("ws"), "general")
        buckets = [[TokenRequest(unique("limit"), 1, 1.0, 5)] for _ in range(200)]
        assert await asyncio.gather(*(tier.take_tokens(b) for b in buckets)) == [0.0] * 200
        pages = await asyncio.gather(*(tier.read_before(channel, None, 10) for _ in range(200)))
        assert pages == [[]] * 200
    finally:
        await tier.close()


@needs_cluster
async def test_a_primary_without_the_write_script_gets_it(tmp_path: Path) -> None:
    """A replica promoted by a failover has no scripts (SCRIPT LOAD is not replicated): the
    writes' EVALSHA meets NOSCRIPT, and the script is loaded again on every primary."""
    tier = create_realtime_tier(realtime_url("redis-cluster", tmp_path), BackendContext())
    await tier.connect()
    try:
        for node in cluster_nodes(seed_ports()):
            if node.is_master:
                cli(node.port, "script", "flush")
        ids = PushIdGenerator()
        workspace = unique("ws")
        channels = [ChannelRef(workspace, f"c{i}") for i in range(20)]
        now = int(time.time() * 1000)
        messages = [
            RealtimeMessage(ids.new_id(), "u1", "Ada", c.channel_id, now, now + REALTIME_TTL_MS)
            for c in channels
        ]
        # Concurrent: they go out as pipelines, one a primary.
        await asyncio.gather(*(tier.write(c, m) for c, m in zip(channels, messages, strict=True)))
        for channel, message in zip(channels, messages, strict=True):
            assert await tier.read(channel, message.message_id) == message
    finally:
        await tier.close()
