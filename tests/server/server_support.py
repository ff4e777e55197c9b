"""Helpers shared by the server tests."""


def damage_state(r, key: str) -> None:
    """Flip one bit inside a stored state's tensor data (past the safetensors header)."""
    state = bytearray(r.hget(key, "state"))
    state[-5] ^= 0x01
    r.hset(key, "state", bytes(state))
