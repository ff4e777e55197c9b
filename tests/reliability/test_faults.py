"""Faults: kill -9 of nsam (embedded Redis) and what ForgetUser then leaves on disk; SIGTERM
with turns in flight; Redis killed under load, then a consolidation worker killed mid-job on
the same store. Goal of every figure: 0."""

import asyncio

import pytest

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def embedded(scenarios, tmp_path_factory):
    """kill -9 during turns, restart on the same data directory, then ForgetUser there."""
    work = tmp_path_factory.mktemp("embedded")
    return asyncio.run(scenarios.kill9(
        work, rounds=1, model="tiny", sessions=3,
        after=lambda d: scenarios.forget(work, "tiny", d)))


@pytest.fixture(scope="module")
def redis_store(scenarios, tmp_path_factory):
    """Redis killed -9 and restarted under load, then a worker killed mid-job on that store."""
    work = tmp_path_factory.mktemp("store")
    return asyncio.run(scenarios.redis_restart(
        work, restarts=1, model="tiny", sessions=4, load_s=3.0,
        after=lambda d: scenarios.worker_crash(work, jobs=1, kills=1, model="tiny", deployment=d)))


def test_kill9_during_turns_loses_no_acknowledged_commit(embedded):
    assert embedded["kill9_lost_commits"] == 0, embedded
    assert embedded["kill9_embedded_redis_outlived"] == 0, embedded  # it goes with nsam
    assert embedded["kill9_turns_checked"] >= 1, embedded


def test_forget_user_leaves_nothing_on_disk(embedded):
    assert embedded["forget_found_before_bytes"] > 0, embedded  # the search finds them when there
    assert embedded["forget_residue_bytes"] == 0, embedded
    assert embedded["data_files_private"], embedded
    assert embedded["forget_other_user_kept"], embedded


def test_redis_killed_and_restarted_under_load_keeps_versions_older_than_1s(redis_store):
    assert redis_store["redis_restart_lost_versions"] == 0, redis_store
    assert redis_store["redis_restart_acks_checked"] >= 1, redis_store


def test_a_worker_killed_mid_job_has_its_job_applied_exactly_once(redis_store):
    assert redis_store["worker_crash_jobs_lost"] == 0, redis_store
    assert redis_store["jobs_applied_twice"] == 0, redis_store
    assert redis_store["worker_jobs_left_in_queue"] == 0, redis_store


def test_sigterm_commits_each_turn_or_tells_its_client(scenarios, tmp_path):
    figures = asyncio.run(scenarios.sigterm(tmp_path, rounds=1, model="tiny", sessions=6))
    assert figures["sigterm_lost_turns"] == 0, figures
    assert figures["sigterm_told_but_saved"] == 0, figures
    assert figures["sigterm_turns_told_not_saved"] + figures["sigterm_turns_committed"] >= 1, figures
