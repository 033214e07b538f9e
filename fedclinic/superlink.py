"""``python -m fedclinic.superlink [flower-superlink flags]``: Flower's own SuperLink, with a
longer SQLite busy timeout and message objects kept in memory. Every coordinator fedclinic
starts runs through it (``fedclinic local``, ``fedclinic bench``, the coordinator image and
``docker-compose.yml``).

Why: the SuperLink keeps its state (messages, object-push sessions, run traffic, task tokens)
in one SQLite database, and nearly every Fleet API request writes to it: a ``PullObject``
expires task tokens and counts traffic, a ``PushMessages`` stores the reply and opens its
object-push session, a ``PushObject`` claims a pending object. SQLite lets one writer in at a
time; the others wait in SQLite's busy handler, which polls (sleeps of 1 to 100 ms) rather
than queueing, for at most ``busy_timeout``, then fail with ``database is locked``. Flower
1.39 sets that to 5 s (``flwr/supercore/constant.py`` ``SQLITE_PRAGMAS``). When many
hospitals' requests arrive at once on a busy machine (16 hospitals on one 2-core machine),
the writes queue for longer than 5 s, and a request that keeps losing the race fails.
Flower answers it with gRPC ``INTERNAL`` (or ``stored=False`` for an object), which its
SuperNode does not retry (it retries ``UNAVAILABLE`` only), so the hospital's reply, or the
model it was fetching, is lost. docs/reliability.md ("Many hospitals") has the evidence.

What this changes, in this process only (nothing on disk, no file of Flower's):

- the ``busy_timeout`` pragma Flower sets on each new SQLite connection: 5000 ms ->
  :data:`BUSY_TIMEOUT_MS`; every other pragma stays as Flower sets it;
- message objects (the models' arrays and chunks) live in Flower's in-memory object store
  instead of the SQLite file (:func:`keep_objects_in_memory`; ``$FEDCLINIC_SUPERLINK_OBJECTS
  = database`` keeps Flower's default): the link state (runs, registered hospitals,
  messages, push sessions) stays in the file;
- Flower's own log lines get a timestamp (uvicorn's already have one), so the SuperLink's
  log shows when a request waited.

It relies on module-level names of Flower's (``flwr.supercore.sql_mixin.SQLITE_PRAGMAS``,
read each time a connection opens, and ``flwr.superlink.main``'s
``get_objectstore_linkstate_factories``), so it refuses to start on any flwr but
:data:`FLWR_VERSION`, or when that name is not what it expects: re-check the cause and this
module before moving to another Flower release.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from fedclinic.flower import LauncherError, launch, require_flower

#: Flower 1.39's value is 5000. The longest wait seen for the write lock was 28 s (16 hospitals
#: on a 2-core machine at load average 40: docs/reliability.md); a request starved for longer
#: than this still fails as before.
BUSY_TIMEOUT_MS = 60_000
#: where the SuperLink keeps message objects (the serialised models, in chunks, until their
#: receiver confirms them): ``memory`` (Flower's in-memory store, as on every SuperNode) or
#: ``database`` (Flower's default with ``--database``: blobs in the SQLite file that also holds
#: the link state). Memory is the default: a ResNet-101 round moved 11 % faster (16.6 s of
#: overhead against 18.7 s, BENCHMARKS.md) and the file no longer takes every model's bytes.
OBJECT_STORES = ("memory", "database")
OBJECT_STORE_ENVIRONMENT = "FEDCLINIC_SUPERLINK_OBJECTS"
DEFAULT_OBJECT_STORE = "memory"


def with_busy_timeout(
    pragmas: Sequence[tuple[str, str]], milliseconds: int
) -> tuple[tuple[str, str], ...]:
    """Flower's pragma list with only ``busy_timeout`` replaced (it must be there)."""
    if not any(name == "busy_timeout" for name, _ in pragmas):
        raise LauncherError(f"no busy_timeout among Flower's SQLite pragmas {list(pragmas)}")
    return tuple(
        (name, str(milliseconds) if name == "busy_timeout" else value) for name, value in pragmas
    )


def check_flower_version(installed: str | None = None) -> None:
    """Refuse any flwr but :data:`FLWR_VERSION` (``installed`` defaults to the real one)."""
    require_flower(
        "fedclinic.superlink",
        "check Flower's SQLite settings (flwr/supercore/constant.py SQLITE_PRAGMAS, "
        "flwr/supercore/sql_mixin.py) and update this launcher",
        installed,
    )


def apply_sqlite_settings(
    sql_mixin: ModuleType, constant: ModuleType, milliseconds: int = BUSY_TIMEOUT_MS
) -> tuple[tuple[str, str], ...]:
    """Set the pragmas Flower's SQL states apply to every new connection; returns them."""
    pragmas = getattr(sql_mixin, "SQLITE_PRAGMAS", None)
    if pragmas is None or not callable(getattr(sql_mixin, "_set_sqlite_pragmas", None)):
        raise LauncherError(
            f"{sql_mixin.__name__} has no SQLITE_PRAGMAS/_set_sqlite_pragmas: not the Flower "
            "this launcher was written against"
        )
    patched = with_busy_timeout(pragmas, milliseconds)
    sql_mixin.SQLITE_PRAGMAS = patched  # type: ignore[attr-defined]  # read per connection
    constant.SQLITE_PRAGMAS = patched  # type: ignore[attr-defined]  # for anyone reading it
    return patched


def object_store_choice(environ: Mapping[str, str]) -> str:
    """``$FEDCLINIC_SUPERLINK_OBJECTS`` (default :data:`DEFAULT_OBJECT_STORE`), checked."""
    value = environ.get(OBJECT_STORE_ENVIRONMENT, DEFAULT_OBJECT_STORE)
    if value not in OBJECT_STORES:
        raise LauncherError(
            f"{OBJECT_STORE_ENVIRONMENT}={value!r} is not allowed: expected "
            f"{' or '.join(OBJECT_STORES)}"
        )
    return value


def keep_objects_in_memory(superlink_main: ModuleType) -> None:
    """Give the SuperLink Flower's in-memory object store beside its SQLite link state.

    Flower builds both from one ``--database`` value
    (``flwr.superlink.config_loader.get_objectstore_linkstate_factories``, imported by name into
    ``flwr.superlink.main``); its SQL link state reaches objects only through the object store
    it is handed, so the two can differ. Runs, registered hospitals and messages stay in the
    file; the objects (which a restarted SuperLink could not use anyway: its ServerApp is gone)
    live in this process's memory until the receiver confirms them, as on every SuperNode.
    """
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory

    if not hasattr(superlink_main, "get_objectstore_linkstate_factories"):
        raise LauncherError(
            f"{superlink_main.__name__} has no get_objectstore_linkstate_factories: not the "
            "Flower this launcher was written against"
        )

    def factories(database: str, federation_manager: Any) -> tuple[Any, Any]:
        objects = ObjectStoreFactory()  # Flower's default: its in-memory store
        return objects, LinkStateFactory(database, federation_manager, objects)

    setattr(superlink_main, "get_objectstore_linkstate_factories", factories)  # noqa: B010


def prepare(environ: Mapping[str, str] = os.environ) -> str:
    """Check the Flower version and apply the settings (before any database is opened);
    returns where message objects are kept."""
    check_flower_version()
    objects = object_store_choice(environ)
    from flwr.supercore import constant, sql_mixin
    from flwr.supercore.logger import update_console_handler

    apply_sqlite_settings(sql_mixin, constant)
    if objects == "memory":
        from flwr.superlink import main as superlink_main

        keep_objects_in_memory(superlink_main)
    update_console_handler(timestamps=True)
    return objects


def start(objects: str) -> None:
    from flwr.supercore.logger import log
    from flwr.superlink.cli import flower_superlink

    log(logging.INFO, "fedclinic.superlink: SQLite busy_timeout %d ms (Flower's default 5000), "
        "message objects in %s", BUSY_TIMEOUT_MS, objects)  # fmt: skip
    flower_superlink()


def main() -> int:
    return launch("flower-superlink", prepare, start)


if __name__ == "__main__":
    sys.exit(main())
