"""Plain Flower FedAvg app: the baseline of ``fedclinic bench system``."""
