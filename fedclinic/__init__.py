"""fedclinic: federated learning across hospitals on Flower (shared code of both sides)."""

__version__ = "0.1.0"
