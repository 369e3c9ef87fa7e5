import os

import pytest

TEST_VOCAB = 512  # small: sentencepiece trains it in well under a second


@pytest.fixture(scope="session")
def vocab():
    return TEST_VOCAB


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """The private cache of tests/conftest.py, set for the whole session as well.

    The root conftest sets MEGASPARSE_CACHE per test function; module-scoped fixtures (built
    before it applies) would otherwise write to the user's ~/.cache/megasparse.
    """
    path = tmp_path_factory.getbasetemp() / "megasparse_cache"
    old = os.environ.get("MEGASPARSE_CACHE")
    os.environ["MEGASPARSE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MEGASPARSE_CACHE", None)
    else:
        os.environ["MEGASPARSE_CACHE"] = old
