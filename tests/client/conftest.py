"""The client tests run against real servers: reuse the service fixtures of tests/server."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "nsam_service_fixtures", Path(__file__).parents[1] / "server" / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

redis_base = _fixtures.redis_base
redis_db = _fixtures.redis_db
settings = _fixtures.settings
start_server = _fixtures.start_server
server = _fixtures.server
client = _fixtures.client
