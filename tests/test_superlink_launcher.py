"""``fedclinic.superlink``: Flower's SuperLink with a longer SQLite busy timeout.

The settings are checked on Flower's real SQL state (a SQLite file, Flower's own connection
hook), and the refusals on other Flower releases; the 16-hospital runs that show why it is
needed are in docs/reliability.md ("Many hospitals").
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import yaml
from dockerfiles import image
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.supercore import constant, sql_mixin
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.object_store.sql_object_store import SqlObjectStore
from flwr.superlink import main as superlink_main
from flwr.superlink.federation import NoOpFederationManager

from fedclinic import flower, superlink
from fedclinic.bench.load import process_kind
from fedclinic.flower import FLWR_VERSION, LauncherError
from fedclinic.superlink import (
    BUSY_TIMEOUT_MS,
    DEFAULT_OBJECT_STORE,
    OBJECT_STORE_ENVIRONMENT,
    apply_sqlite_settings,
    check_flower_version,
    keep_objects_in_memory,
    object_store_choice,
    with_busy_timeout,
)

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_busy_timeout_changes() -> None:
    flower = (("busy_timeout", "5000"), ("journal_mode", "WAL"), ("foreign_keys", "ON"))
    assert with_busy_timeout(flower, 60_000) == (
        ("busy_timeout", "60000"), ("journal_mode", "WAL"), ("foreign_keys", "ON"),
    )  # fmt: skip
    with pytest.raises(LauncherError, match="no busy_timeout"):
        with_busy_timeout((("journal_mode", "WAL"),), 60_000)


def test_flower_1_39_defaults_are_what_the_launcher_replaces() -> None:
    """The installed Flower is the one it was written against, with the 5 s it raises."""
    check_flower_version()
    assert dict(constant.SQLITE_PRAGMAS)["busy_timeout"] == "5000"
    assert sql_mixin.SQLITE_PRAGMAS is constant.SQLITE_PRAGMAS
    assert BUSY_TIMEOUT_MS > 5000


def test_other_flower_releases_are_refused() -> None:
    check_flower_version(FLWR_VERSION)
    with pytest.raises(LauncherError, match=r"flwr==1\.40\.0"):
        check_flower_version("1.40.0")
    renamed = types.ModuleType("flwr.supercore.sql_mixin")  # internals moved: refuse too
    with pytest.raises(LauncherError, match="no SQLITE_PRAGMAS"):
        apply_sqlite_settings(renamed, types.ModuleType("constant"))


def test_flowers_sql_state_gets_the_longer_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SQLite file state of Flower's (its own connection hook) answers the new pragma."""
    from flwr.supercore.object_store import ObjectStoreFactory

    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    monkeypatch.setattr(constant, "SQLITE_PRAGMAS", constant.SQLITE_PRAGMAS)
    before = dict(sql_mixin.SQLITE_PRAGMAS)
    applied = apply_sqlite_settings(sql_mixin, constant)
    assert dict(applied) == {**before, "busy_timeout": str(BUSY_TIMEOUT_MS)}
    store = ObjectStoreFactory(str(tmp_path / "state.db")).store()
    assert store.query("PRAGMA busy_timeout") == [{"timeout": BUSY_TIMEOUT_MS}]
    assert store.query("PRAGMA journal_mode") == [{"journal_mode": "wal"}]  # Flower's own


def test_launcher_refuses_another_flower_without_starting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(flower.metadata, "version", lambda name: "1.42.0")
    assert superlink.main() == flower.EXIT_REFUSED
    assert "written against flwr==1.39.0, found flwr==1.42.0" in capsys.readouterr().err


# `python -m fedclinic.superlink --help`: tests/test_supernode_launcher.py (both launchers)


def test_every_coordinator_starts_through_the_launcher() -> None:
    """The coordinator image (so docker compose) and the benchmarks' view of it."""
    assert image("coordinator")["entrypoint"] == ["fedclinic", "coordinator"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert "entrypoint" not in compose["coordinator"]  # the image's, so the launcher
    # `fedclinic coordinator` starts `python -m fedclinic.superlink`: tests/test_coordinator.py
    # LocalFederation.superlink_command: tests/test_federation_unit.py
    # the benchmarks still see it as the SuperLink
    assert process_kind(f"{sys.executable} -m fedclinic.superlink --insecure") == (
        "flower-superlink"
    )
    assert process_kind("/venv/bin/flower-superlink --insecure") == "flower-superlink"
    assert process_kind("/venv/bin/python /venv/bin/flwr-clientapp --x") == "flwr-clientapp"
    assert process_kind("/usr/bin/python -m fedclinic.cli local") is None


def test_objects_in_memory_beside_the_sql_link_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``memory``: Flower's SQL link state on the file, handed Flower's in-memory object store
    (what a model's chunks go through), and nothing of the objects in the file."""
    flowers = superlink_main.get_objectstore_linkstate_factories
    database = str(tmp_path / "state.db")
    objects, links = flowers(database, NoOpFederationManager())  # Flower's: one file for both
    assert isinstance(objects.store(), SqlObjectStore)

    monkeypatch.setattr(superlink_main, "get_objectstore_linkstate_factories", flowers)
    keep_objects_in_memory(superlink_main)
    objects, links = superlink_main.get_objectstore_linkstate_factories(
        str(tmp_path / "other.db"), NoOpFederationManager()
    )
    state = links.state()
    assert isinstance(state, SqlLinkState) and (tmp_path / "other.db").is_file()
    assert isinstance(objects.store(), InMemoryObjectStore)
    assert state.object_store is objects.store()  # the state reaches objects only through it


def test_the_object_store_choice_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert object_store_choice({}) == DEFAULT_OBJECT_STORE == "memory"
    assert object_store_choice({OBJECT_STORE_ENVIRONMENT: "database"}) == "database"
    with pytest.raises(LauncherError, match="expected memory or database"):
        object_store_choice({OBJECT_STORE_ENVIRONMENT: "disk"})
    renamed = types.ModuleType("flwr.superlink.main")  # Flower's name moved: refuse
    with pytest.raises(LauncherError, match="no get_objectstore_linkstate_factories"):
        keep_objects_in_memory(renamed)
