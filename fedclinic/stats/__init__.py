"""Federated statistics: what each hospital holds, and pooled values computed exactly from
per-site sums, without moving a record (docs/statistics.md).

- :mod:`~fedclinic.stats.protocol`: what a statistics exchange asks (``StatsRequest``) and
  what a hospital answers (``SiteAnswer``), both validated on arrival;
- :mod:`~fedclinic.stats.site`: the hospital's half: counts, sums and histograms of its raw
  data, with the minimum cell size applied before anything leaves the site;
- :mod:`~fedclinic.stats.pool`: the coordinator's half: pooled values from the released
  per-site sums, histogram requests, federated normalisation, flags;
- :mod:`~fedclinic.stats.report` and :mod:`~fedclinic.stats.command`: ``stats.json``, the
  HTML/PNG report and ``fedclinic stats`` (app layer: nothing in core imports them).

The exchanges themselves run through the round engine (:mod:`fedclinic.engine.survey`).
"""
