"""Step cache keys are the same in every process: a UI Retry (a new process) must find the finished steps."""

from __future__ import annotations

import os
import subprocess
import sys

from privacy_ops.settings import PROJECT_ROOT

# Inputs shaped like an erasure's subject snapshot: sets of strings (ordered by the process's hash seed), a dict,
# a dataclass and an enum.
KEY_OF_SNAPSHOT = """
from dataclasses import dataclass
from prefect.utilities.hashing import hash_objects
from privacy_ops.lifecycle.requests import Right
from tasks.step import stable

@dataclass(frozen=True)
class Snapshot:
    emails: frozenset[str]
    names: set[str]
    locations: dict[str, list[str]]

snapshot = Snapshot(
    frozenset({"ann@example.org", "a.n@example.org", "ann.b@example.net", "x@y.z"}),
    {"Ann Example", "Ann", "Example", "A. Example"},
    {"s3": ["content/accounts/7/"], "stripe": ["cus_1", "cus_2"]},
)
print(hash_objects(stable({"snapshot": snapshot, "right": Right.erasure, "ids": [7, 8]}), raise_on_failure=True))
"""


def _key_with_hash_seed(seed: int) -> str:
    environment = os.environ | {"PYTHONHASHSEED": str(seed)}
    done = subprocess.run(
        [sys.executable, "-c", KEY_OF_SNAPSHOT],
        cwd=PROJECT_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout.strip()


def test_the_cache_key_of_set_valued_inputs_does_not_depend_on_the_process() -> None:
    keys = {_key_with_hash_seed(seed) for seed in (1, 2, 3, 4)}
    assert len(keys) == 1 and next(iter(keys))
