"""Benchmarks: ``fedclinic bench quality`` (model quality per hospital on real medical data) and
``fedclinic bench report`` (renders the results into ``BENCHMARKS.md`` with plots).

Quality sweeps run the same ServerApp strategy and ClientApp code as a deployment, in one
process (:mod:`fedclinic.bench.grid`) instead of over gRPC.
"""
