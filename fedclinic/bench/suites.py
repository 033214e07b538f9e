"""The quality suites (``fedclinic bench quality --suite``), in the order the report prints them."""

#: the PneumoniaMNIST suites (one partition each; fedclinic.bench.quality.pneumonia_plan)
PNEUMONIA_SUITES = ("pneumonia", "pneumonia-skew", "pneumonia-skew-heldout", "pneumonia-privacy")
#: every quality suite
SUITES = ("heart", "heart-federated", *PNEUMONIA_SUITES)
