"""``fedclinic local``: a real Flower federation on this machine (one process per role).

- :mod:`.configs`: run and hospital configs, resolved and validated before anything starts;
- :mod:`.command`: the ``fedclinic local`` command and its pre-flight;
- :mod:`.ports`: free loopback ports, so parallel federations never collide;
- :mod:`.supervisor`: daemons started in their own sessions and stopped without leftovers;
- :mod:`.supernode`: Flower's SuperNode command line and what its exit means;
- :mod:`.flwr_cli`: the ``flwr`` CLI as typed calls (register, run, ls, log, stop);
- :mod:`.progress`: live metric rows, a round progress bar and the final table;
- :mod:`.federation`: :class:`~.federation.LocalFederation`, which puts them together.

Nothing is imported here, so the light modules (ports, supernode) load without torch.
"""
