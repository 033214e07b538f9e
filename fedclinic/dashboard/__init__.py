"""``fedclinic dashboard``: the coordinator's runs in a browser, live, per hospital. Read-only.

- :mod:`.runs`: what a run directory says (``config.json``, ``metrics.jsonl``,
  ``audit.jsonl``, ``summary.json``, the models), as JSON views for the pages;
- :mod:`.nodes`: the SuperLink's node list through ``flwr supernode list``;
- :mod:`.app`: the Starlette app (pages, JSON API, model downloads) and its guards (token,
  allowed hosts, Content-Security-Policy);
- :mod:`.command`: the ``fedclinic dashboard`` command, and the dashboard that ``fedclinic
  local --dashboard`` starts beside its run.

Nothing here writes, starts or stops anything; hospitals' strings (names, error messages)
reach the page only as text (server templates autoescape; the page's script sets
``textContent``).
"""
