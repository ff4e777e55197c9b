"""`nsam chat`'s command line."""

import argparse

from nsam.client.chat import sampling_from_args


def test_the_chat_commands_sampling_flags_reach_the_request_and_the_rest_stay_the_servers():
    args = argparse.Namespace(max_tokens=40, temperature=None, repetition_penalty=1.2)
    msg = sampling_from_args(args).to_pb()
    assert msg.max_tokens == 40 and abs(msg.repetition_penalty - 1.2) < 1e-6
    assert not msg.HasField("temperature")
