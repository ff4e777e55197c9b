"""Hostile and careless input against one server with API keys: user A's key against user B's
data, and a Hypothesis fuzz over every RPC. Goal of every figure: 0."""

import asyncio

import pytest

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def deployment(scenarios, tmp_path_factory):
    d = scenarios.keyed(tmp_path_factory.mktemp("keyed"), "tiny")
    yield d
    d.close()


def test_one_users_key_reaches_nothing_of_another(scenarios, deployment, tmp_path):
    figures = asyncio.run(scenarios.cross_user(tmp_path, "tiny", deployment))
    assert figures["cross_user_reads"] == 0, figures


def test_fuzz_every_rpc_no_crash_and_no_write_from_a_failed_call(scenarios, deployment, tmp_path):
    figures = scenarios.fuzz(tmp_path, cases=260, model="tiny", deployment=deployment)
    assert figures["fuzz_cases"] >= 200, figures
    assert figures["fuzz_crashes"] == 0, figures["fuzz_crash_examples"]
    assert figures["fuzz_writes"] == 0, figures
    assert figures["fuzz_ok_calls"] >= 1, figures  # valid requests were among them
