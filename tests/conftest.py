"""Shared fixtures. Azurite is started here, by the test run itself, on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_worker import set_openmp_defaults

set_openmp_defaults()  # as gpu_worker/__main__.py does, before any test imports torch
REPO = Path(__file__).resolve().parents[1]
AZURITE = REPO / "node_modules" / ".bin" / "azurite-blob"
# Azurite's published development account (a well-known constant, not a secret).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--durable-event-seed", type=int, default=None,
                     help="run every LocalDurableHost with this seed for random event delivery (DURABLE_EVENT_SEED)")


def pytest_configure(config: pytest.Config) -> None:
    seed = config.getoption("--durable-event-seed")
    if seed is not None:  # read by LocalDurableHost when it is given no event_seed
        os.environ["DURABLE_EVENT_SEED"] = str(seed)


@pytest.fixture(scope="session", autouse=True)
def _weights_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep converted weights out of the developer's home; shared by the whole run (and worker processes)."""
    os.environ.setdefault("GPU_WORKER_CACHE", str(tmp_path_factory.mktemp("weights-cache")))


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A connection string for a fresh Azurite blob service."""
    if not AZURITE.exists():
        pytest.fail("Azurite is not installed: run `make test` (it runs `npm ci`) or `npm ci`")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    location = tmp_path_factory.mktemp("azurite")
    proc = subprocess.Popen(
        [str(AZURITE), "--silent", "--skipApiVersionCheck", "--blobHost", "127.0.0.1", "--blobPort", str(port),
         "--location", str(location)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"Azurite exited: {proc.stderr.read().decode()[-500:]}")
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("Azurite did not start within 30 s")
    try:
        yield (f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
               f"BlobEndpoint=http://127.0.0.1:{port}/{DEV_ACCOUNT};")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(location, ignore_errors=True)
