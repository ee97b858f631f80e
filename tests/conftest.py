"""Shared test setup: offline, deterministic, tiny models (no downloads)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from pruneviz.testing import FAMILIES, tiny_model, tiny_tokenizer  # noqa: E402

# Under pytest-xdist (make test runs two workers on two cores) each worker computes on one thread.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))


def pytest_collection_modifyitems(config, items):
    """Longest first, so that no worker is left alone with a long file at the end: the browser journey (one test
    of minutes) leads, then the files with the most tests. ``make test`` passes ``--no-loadscope-reorder`` so that
    pytest-xdist's ``--dist loadfile`` hands the files out in this order; its own reordering (by test count only)
    would put the one-test journey last, after every other file, and the run would wait minutes on one core."""
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    order = sorted(files, key=lambda f: (not any(i.get_closest_marker("e2e") for i in files[f]), -len(files[f])))
    items[:] = [i for f in order for i in files[f]]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny(family):
    return tiny_model(family)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def ids():
    return torch.randint(4, 96, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def bundled():
    """The real bundled SmolLM2-135M-Instruct (converted once to a safetensors cache)."""
    from pruneviz.loading import load_model

    return load_model("bundled", device="cpu", dtype="fp32")


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads; on a busy 2-core box 2 threads make them ~20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def private_selfcal_cache(tmp_path_factory, monkeypatch):
    """Self-generated calibration caches go to a per-session temporary folder, never the user's cache."""
    import pruneviz.selfcal

    folder = tmp_path_factory.getbasetemp() / "selfcal-cache"
    monkeypatch.setattr(pruneviz.selfcal, "cache_dir", lambda: folder)


@pytest.fixture(autouse=True)
def private_run_store(tmp_path, monkeypatch):
    """Runs go to a per-test store, never the user's; AppTest runs wait for the background jobs they start (a test
    of the jobs panel itself sets ``PRUNEVIZ_JOB_WAIT=0``)."""
    monkeypatch.setenv("PRUNEVIZ_RUNS", str(tmp_path / "runs.sqlite"))
    monkeypatch.setenv("PRUNEVIZ_JOB_WAIT", "300")


@pytest.fixture
def tiny_app(monkeypatch, tmp_path):
    """The app on its tiny random model, exporting into this test's folder (AppTests ask for it)."""
    monkeypatch.setenv("PRUNEVIZ_MODEL", "tiny")
    monkeypatch.setenv("PRUNEVIZ_EXPORT_DIR", str(tmp_path / "exports"))
