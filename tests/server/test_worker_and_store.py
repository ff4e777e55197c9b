"""The store's compare-and-set and leases, and the consolidation consumer group."""

import asyncio

import pytest

from nsam.model.runtime import NsamModel
from nsam.server.engine import LevelBook, ModelThread
from nsam.server.errors import Busy, Conflict
from nsam.server.store import STREAM, StateStore
from nsam.server.worker import ConsolidationWorker, Consolidator

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
async def store(redis_db, tmp_path):
    s = await StateStore.connect(redis_db[0], tmp_path, versions_kept=3)
    yield s
    await s.close()


async def until(condition, seconds: float = 10.0) -> bool:
    """Polls `condition` until it holds or `seconds` pass; returns whether it held."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return bool(condition())


@pytest.fixture
def model_thread():
    thread = ModelThread(NsamModel.load("tiny"), 1, generate=False)
    yield thread
    thread.stop()


async def test_commit_turn_is_compare_and_set(store):
    s = await store.create_session("alice", b"state0", 0, [])
    assert await store.commit_turn(s, b"state1", [{"role": "user", "content": "a"}]) == 1
    with pytest.raises(Conflict):  # a writer that read version 0 too
        await store.commit_turn(s, b"state-lost", [])
    after = await store.get_session(s.session_id, with_state=True)
    assert after.state == b"state1" and after.version == 1


async def test_user_level_cas_and_pruning(store):
    assert await store.commit_user_level("alice", 0, b"v1", "import") == 1
    with pytest.raises(Conflict):
        await store.commit_user_level("alice", 0, b"lost", "import")
    for i in range(2, 6):
        assert await store.commit_user_level("alice", i - 1, b"v%d" % i, "import") == i
    assert [v.version for v in await store.user_level_versions("alice")] == [5, 4, 3]
    assert (await store.get_user_level("alice")).state == b"v5"
    assert len(await store.user_keys("alice")) == 2 + 3  # level, versions set, 3 versions


async def test_lease_is_exclusive_and_released_only_by_its_owner(store):
    s = await store.create_session("alice", b"x", 0, [])
    token = await store.acquire_lease(s.session_id, 10_000, 0)
    with pytest.raises(Busy):
        await store.acquire_lease(s.session_id, 10_000, 0.05)
    await store.release_lease(s.session_id, "someone-else")  # compare-and-delete: no effect
    with pytest.raises(Busy):
        await store.acquire_lease(s.session_id, 10_000, 0)
    await store.release_lease(s.session_id, token)
    await store.release_lease(s.session_id, await store.acquire_lease(s.session_id, 10_000, 0))


async def test_lease_expires(store):
    s = await store.create_session("alice", b"x", 0, [])
    await store.acquire_lease(s.session_id, 50, 0)  # a crashed holder never releases
    assert await store.acquire_lease(s.session_id, 10_000, 1.0)


async def _session_with_a_turn(store, model_thread, user="alice"):
    model = model_thread.model
    state = await model_thread.call(model.new_session_state, None)
    s = await store.create_session(user, state, 0, [])
    transcript = [{"role": "user", "content": "My dog's name is Rex."},
                  {"role": "assistant", "content": "Nice."}]
    version = await store.commit_turn(s, state, transcript)
    return await store.get_session(s.session_id), version


async def test_jobs_of_a_crashed_worker_are_reclaimed(store, model_thread):
    session, version = await _session_with_a_turn(store, model_thread)
    await store.ensure_group()
    await store.enqueue_consolidation(session, version)
    # worker "a" reads the job and dies before acknowledging it
    [job] = await store.read_jobs("a", 1, 100)
    assert (await store.queue_stats()).pending == 1
    consolidator = Consolidator(store, model_thread, LevelBook())
    b = ConsolidationWorker(store, consolidator, "b", claim_idle_ms=100, block_ms=50)
    await asyncio.sleep(0.2)
    task = asyncio.create_task(b.run())
    await until(lambda: b.processed)
    b.stop()
    await task
    assert b.processed == 1
    assert await store.user_level_version("alice") == 1
    stats = await store.queue_stats()
    assert stats.depth == 0 and stats.pending == 0


async def test_workers_share_the_stream(store, model_thread):
    await store.ensure_group()
    for i in range(3):
        session, version = await _session_with_a_turn(store, model_thread, f"user{i}")
        await store.enqueue_consolidation(session, version)
    consolidator = Consolidator(store, model_thread, LevelBook())
    workers = [ConsolidationWorker(store, consolidator, name, block_ms=50) for name in "xyz"]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    await until(lambda: sum(w.processed for w in workers) == 3)
    for w in workers:
        w.stop()
    await asyncio.gather(*tasks)
    assert sum(w.processed for w in workers) == 3
    assert sum(1 for w in workers if w.processed) >= 2
    assert [await store.user_level_version(f"user{i}") for i in range(3)] == [1] * 3


async def test_consolidation_of_a_forgotten_session_writes_nothing(store, model_thread, redis_db):
    session, version = await _session_with_a_turn(store, model_thread)
    await store.ensure_group()
    await store.enqueue_consolidation(session, version)
    await store.forget_user("alice")
    consolidator = Consolidator(store, model_thread, LevelBook())
    outcome = await consolidator.run(session.session_id)
    assert outcome.outcome == "skipped"
    assert redis_db[1].keys("*alice*") == [] and redis_db[1].xlen(STREAM) == 0


async def test_an_accepted_consolidation_counts_what_the_drift_budget_kept(store, model_thread):
    from nsam.server import metrics

    session, _ = await _session_with_a_turn(store, model_thread)
    kept = metrics.consolidation_trust_region_total.labels("full")
    before = kept._value.get()
    steps_before = _histogram(metrics.consolidation_steps)
    said_before = _histogram(metrics.consolidation_answers_said_ratio)
    outcome = await Consolidator(store, model_thread, LevelBook()).run(session.session_id)
    assert outcome.outcome == "accepted" and kept._value.get() == before + 1
    count, total = _histogram(metrics.consolidation_steps)
    assert count == steps_before[0] + 1 and total - steps_before[1] >= 1  # the steps it trained
    count, total = _histogram(metrics.consolidation_answers_said_ratio)
    assert count == said_before[0] + 1 and 0.0 <= total - said_before[1] <= 1.0


def _histogram(histogram) -> tuple[float, float]:
    """(count, sum) of an unlabelled histogram, as /metrics would show them."""
    samples = {s.name: s.value for metric in histogram.collect() for s in metric.samples}
    name = histogram._name
    return samples[f"{name}_count"], samples[f"{name}_sum"]


async def test_concurrent_consolidations_do_not_lose_an_update(store, model_thread):
    s1, _ = await _session_with_a_turn(store, model_thread)
    s2, _ = await _session_with_a_turn(store, model_thread)
    consolidator = Consolidator(store, model_thread, LevelBook())
    results = await asyncio.gather(consolidator.run(s1.session_id), consolidator.run(s2.session_id))
    assert sorted(r.outcome for r in results) == ["accepted", "accepted"]
    assert await store.user_level_version("alice") == 2


async def test_a_consolidation_running_at_shutdown_is_interrupted_and_redone_later(store, redis_db):
    """Shutdown does not wait minutes for a consolidation: it stops at its next step, nothing is
    committed, and its job stays queued for the next worker."""
    import time
    from dataclasses import replace

    slow = ModelThread(NsamModel.load("tiny"), 1, generate=False)
    config = slow.model.consolidation
    slow.model.consolidation = replace(config, rehearsal=replace(config.rehearsal, steps=100_000))  # runs for hours
    session, version = await _session_with_a_turn(store, slow)
    await store.ensure_group()
    await store.enqueue_consolidation(session, version)
    worker = ConsolidationWorker(store, Consolidator(store, slow, LevelBook()), "a", block_ms=50)
    task = asyncio.create_task(worker.run())
    assert await until(lambda: worker.busy)
    started = time.monotonic()
    await worker.shutdown(task, 0.2)
    await asyncio.to_thread(slow.stop)
    assert time.monotonic() - started < 10 and not slow._thread.is_alive()
    assert await store.user_level_version("alice") == 0 and worker.processed == 0
    assert (await store.queue_stats()).pending == 1  # not acknowledged: it is redone

    fresh = ModelThread(NsamModel.load("tiny"), 1, generate=False)
    try:
        redo = ConsolidationWorker(store, Consolidator(store, fresh, LevelBook()), "b",
                                   claim_idle_ms=100, block_ms=50)
        await asyncio.sleep(0.2)
        task = asyncio.create_task(redo.run())
        await until(lambda: redo.processed)
        redo.stop()
        await task
    finally:
        fresh.stop()
    assert await store.user_level_version("alice") == 1
    assert (await store.queue_stats()).pending == 0


async def test_embedded_redis_left_by_a_crash_is_stopped_and_its_data_kept(tmp_path):
    """A redis-server whose nsam died (lock gone, server still up) is found by its pid file,
    shut down with a save, and a fresh one serves the same data."""
    import os

    import redis

    from nsam.server.embedded_redis import DataDirInUse, EmbeddedRedis

    data = tmp_path / "data"
    old = EmbeddedRedis(data, die_with_parent=False)
    old.wait_ready()
    redis.Redis(unix_socket_path=old.socket_path).set("k", "v")
    with pytest.raises(DataDirInUse, match="in use by another nsam"):
        EmbeddedRedis(data)
    old._release_data_dir()  # nsam "crashed": its lock is gone, its redis-server is not
    new = EmbeddedRedis(data)
    try:
        new.wait_ready()
        assert old.proc.wait(10) is not None  # the stale server was stopped
        assert redis.Redis(unix_socket_path=new.socket_path).get("k") == b"v"
        assert all(oct(f.stat().st_mode & 0o777) in ("0o600", "0o700") for f in data.iterdir())
        assert data.stat().st_mode & 0o777 == 0o700
    finally:
        new.close()
    assert new.proc.poll() is not None and not (data / "redis.pid").exists()
    assert not os.path.exists(f"/proc/{new.proc.pid}/cmdline") or new.proc.returncode is not None
