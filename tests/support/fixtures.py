"""Where the real data files the tests read live: inside the repository, `tests/fixtures/`."""

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
