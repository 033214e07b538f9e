"""``fedclinic local``: a real Flower federation on this machine (one process per role).

- :mod:`.configs`: run and hospital configs, resolved and validated before anything starts;
- :mod:`.ports`: free loopback ports, so parallel federations never collide;
- :mod:`.supervisor`: daemons started in their own sessions and stopped without leftovers;
- :mod:`.flwr_cli`: the ``flwr`` CLI as typed calls (register, run, ls, log, stop);
- :mod:`.progress`: live metric rows, a round progress bar and the final table;
- :mod:`.federation`: :class:`LocalFederation`, which puts them together.
"""

from fedclinic.local.federation import (
    FederationError,
    FederationOptions,
    Interrupted,
    LocalFederation,
    RunOutcome,
)
from fedclinic.local.supervisor import ProcessSupervisor

__all__ = [
    "FederationError",
    "FederationOptions",
    "Interrupted",
    "LocalFederation",
    "ProcessSupervisor",
    "RunOutcome",
]
