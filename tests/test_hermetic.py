"""The suite never depends on where it is started: not the working directory (a ``catalog.db`` or a demo
output there), not the user's ``$ADAPTERHUB_CATALOG``, not the home caches."""
from __future__ import annotations

import os
from pathlib import Path


def test_each_test_runs_in_a_private_empty_directory(request):
    started_in = Path(request.config.invocation_params.dir).resolve()
    here = Path.cwd().resolve()
    assert here != started_in
    assert not any(here.iterdir()), f"{here} is not empty"


def test_the_users_catalog_and_caches_are_not_used():
    assert "ADAPTERHUB_CATALOG" not in os.environ
    home = Path.home().resolve()
    for var in ("ADAPTERHUB_CACHE", "HF_HOME"):
        assert home not in Path(os.environ[var]).resolve().parents, f"${var} is under the home folder"
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_a_catalog_in_the_starting_directory_is_not_seen(request):
    """The defect: ``adapterhub demo`` run in the checkout left ``./catalog.db`` and a test's message changed."""
    from adapterhub.catalog.db import catalog_url

    started_in = Path(request.config.invocation_params.dir).resolve()
    assert str(started_in / "catalog.db") not in catalog_url(None)
