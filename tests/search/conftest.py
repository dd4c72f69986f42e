"""Fixtures of the search tests that several files share."""
import json
import os

import pytest


@pytest.fixture(scope="session")
def reference(tmp_path_factory, model_cache):
    """The resume tests' uninterrupted small search, computed once per session: under
    pytest-xdist the first worker to need it runs it and the others read its JSON."""
    from tests.search.resume_helpers import uninterrupted_reference

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return uninterrupted_reference(tmp_path_factory.mktemp("ref") / "s.db", model_cache)
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the session's directory, common to its workers
    with FileLock(str(shared / "resume-reference.lock")):
        path = shared / "resume-reference.json"
        if not path.exists():
            path.write_text(json.dumps(uninterrupted_reference(tmp_path_factory.mktemp("ref") / "s.db", model_cache)))
        return json.loads(path.read_text())
