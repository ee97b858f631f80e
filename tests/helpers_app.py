"""Shared AppTest helpers: the app file and the happy-path check every AppTest applies after a run."""
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def clean(at: AppTest) -> AppTest:
    """Fail on exceptions and on error messages (a happy path shows none)."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at
