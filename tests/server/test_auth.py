"""API keys: a user reaches only their own sessions and memory; admin RPCs need admin."""

import shutil
import subprocess

import grpc
import pytest

from nsam.client import AsyncClient, NsamError, Sampling
from nsam.server.auth import ApiKeys, Principal

pytestmark = pytest.mark.asyncio(loop_scope="session")

KEYS = """# test keys
alice-key user:alice
bob-key   user:bob

root-key admin
"""


@pytest.fixture
async def keyed(start_server, settings, tmp_path):
    path = tmp_path / "keys"
    path.write_text(KEYS)
    server = await start_server(settings, api_keys_file=path)
    target = f"127.0.0.1:{server.port}"
    clients = {name: AsyncClient(target, api_key=key) for name, key in
               (("alice", "alice-key"), ("bob", "bob-key"), ("admin", "root-key"),
                ("anonymous", None), ("wrong", "guess"))}
    yield clients
    for c in clients.values():
        await c.close()


async def code_of(coro) -> grpc.StatusCode:
    try:
        await coro
    except NsamError as err:
        return err.code
    return grpc.StatusCode.OK


async def test_keys_file_parsing(tmp_path):
    keys = ApiKeys.from_lines(KEYS.splitlines())
    assert keys.principal([("authorization", "Bearer alice-key")]) == Principal(user="alice")
    assert keys.principal([("x-api-key", "root-key")]) == Principal(admin=True)
    for bad in (["k user:"], ["k root"], ["k"], ["# only a comment"], ["k user:a b"]):
        with pytest.raises(ValueError):
            ApiKeys.from_lines(bad)


async def test_unauthenticated_calls_are_refused(keyed):
    for name in ("anonymous", "wrong"):
        assert await code_of(keyed[name].create_session("alice")) == grpc.StatusCode.UNAUTHENTICATED
        assert await code_of(keyed[name].memory_health()) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_user_reaches_only_their_own_sessions(keyed):
    alice, bob = keyed["alice"], keyed["bob"]
    s = await alice.create_session()  # the key names the user
    assert s.user == "alice"
    await alice.send(s.session_id, "my secret", Sampling(max_tokens=3))
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(alice.create_session("bob")) == denied
    assert await code_of(bob.get_session(s.session_id, include_transcript=True)) == denied
    assert await code_of(bob.send(s.session_id, "hijack")) == denied
    assert await code_of(bob.end_session(s.session_id)) == denied
    assert await code_of(bob.read_document(s.session_id, "planted text")) == denied
    for call in (bob.memory("alice"), bob.export_memory("alice"), bob.rollback(1, "alice"),
                 bob.forget("alice"), bob.import_memory(b"x" * 10, "alice")):
        assert await code_of(call) == denied
    assert (await alice.get_session(s.session_id)).version == 1


async def test_admin_calls_need_admin(keyed):
    s = await keyed["alice"].create_session()
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(keyed["alice"].consolidate_now("alice")) == denied
    assert await code_of(keyed["alice"].memory_health()) == denied
    assert await code_of(keyed["admin"].memory_health()) == grpc.StatusCode.OK
    assert await code_of(keyed["admin"].consolidate_now("alice", s.session_id)) == grpc.StatusCode.OK
    # an admin must name the user: it has none of its own
    assert await code_of(keyed["admin"].create_session()) == grpc.StatusCode.INVALID_ARGUMENT


async def test_open_local_mode_lets_anyone_name_a_user(client):
    s = await client.create_session("carol")
    assert s.user == "carol"
    assert (await client.memory_health()).learning


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
async def test_tls(start_server, settings, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = await start_server(settings, tls_cert=cert, tls_key=key)
    async with AsyncClient(f"localhost:{server.port}", root_cert=cert) as c:
        assert (await c.create_session("alice")).user == "alice"
    async with AsyncClient(f"localhost:{server.port}") as plain:
        assert await code_of(plain.create_session("alice")) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("content, where", [
    ("alice-key user:alice\nbroken-line\n", ":2: expected '<key> <principal>'"),
    ("k user:al ice\n", ":1: expected"),
    ("k root\n", ":1: principal must be"),
    (b"k admin\n\xff\xfe user:x\n", ":2: not UTF-8"),
])
async def test_a_malformed_keys_file_names_file_and_line(tmp_path, content, where):
    from nsam.server.auth import KeysFileError

    path = tmp_path / "keys"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(KeysFileError) as err:
        ApiKeys.from_file(path)
    assert f"{path}{where}" in str(err.value)


async def test_nsam_serve_with_a_malformed_keys_file_says_one_line(tmp_path):
    import sys

    path = tmp_path / "keys"
    path.write_text("alice-key user:alice\nbroken-line\n")
    run = subprocess.run([sys.executable, "-m", "nsam.server.cli", "serve", "--api-keys-file", str(path),
                          "--model", "tiny", "--port", "0", "--metrics-port", "0",
                          "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip() == f"nsam serve: {path}:2: expected '<key> <principal>', got 1 fields", run.stderr
