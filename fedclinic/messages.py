"""The keys of the messages between the coordinator and a hospital, for both halves.

One round trip: the coordinator sends a ``RecordDict`` with :data:`ARRAYS` (the model, for
TRAIN and EVALUATE messages) and :data:`CONFIG`; the hospital replies with :data:`METRICS`,
:data:`INFO` and, when it trained, :data:`ARRAYS` (its update). A hospital that cannot answer
replies with :data:`INFO` only, carrying :data:`ERROR`. Algorithm-specific keys (FedHelp's
role, pFedNet's sketch) are named here too, so that neither half spells a key the
other does not know.

Round numbering: a message of server round ``r`` carries the global model after ``r - 1``
rounds (:func:`model_round`); round 0 is the one-time setup query, and after ``R`` rounds the
final evaluation is server round ``R + 1``.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------ records
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
INFO = "info"

# ------------------------------------------------------------------ config (coordinator ->)
SERVER_ROUND = "server-round"
#: the folder a hospital files its site state under (fedclinic.site)
SITE_KEY = "site-key"
#: the last, evaluate-only exchange of a run
FINAL = "final"
#: which of the round's exchanges this message belongs to (fedclinic.engine.Exchange.name)
EXCHANGE = "exchange"
#: whether the hospital evaluates the model before training (False: train only)
EVALUATE = "evaluate"
#: 1 for the first message of an exchange to a hospital, 2.. when it is asked again
ATTEMPT = "attempt"
#: a statistics exchange's request, JSON (fedclinic.stats.request.StatsRequest)
STATS_REQUEST = "stats-request"
#: the pooled train mean/std every hospital normalises with (normalisation = federated)
NORMALISATION_MEAN = "normalisation-mean"
NORMALISATION_STD = "normalisation-std"
#: the model round selected on validation data so far (absent before any evaluation): the
#: hospital keeps the site versions that round deployed (fedclinic.site)
SELECTED_ROUND = "selected-round"
FEDHELP_ROLE = "fedhelp-role"
#: secure aggregation (fedclinic.secagg): the stage of a message, and each stage's inputs
SECAGG_STAGE = "secagg-stage"
#: a random name of the coordinator's round: a hospital answers a repeated message of the
#: same session as before, and starts afresh for a new one (a resumed coordinator)
SECAGG_SESSION = "secagg-session"
SECAGG_THRESHOLD = "secagg-threshold"
SECAGG_CLIPPING = "secagg-clipping"
SECAGG_LEVELS = "secagg-levels"
#: "num-train": a hospital weights its update by its training-set size; "equal": by 1
SECAGG_WEIGHTING = "secagg-weighting"
#: share-keys: the hospital's secure ID, its neighbours' secure IDs and public keys
SECAGG_ID = "secagg-id"
SECAGG_IDS = "secagg-ids"
#: collect: the encrypted shares addressed to the hospital, and their senders
SECAGG_SOURCES = "secagg-sources"
#: unmask: neighbours whose seed shares (uploaded) or key shares (dropped) are asked for
SECAGG_ACTIVE = "secagg-active"
SECAGG_DEAD = "secagg-dead"
PFEDNET_SKETCH = "pfednet-sketch"

# ---------------------------------------------------------------------- info (<- hospital)
HOSPITAL = "hospital"
ERROR = "error"
ROLE = "role"
DEVICE = "device"
#: which model the hospital evaluated: "global", "local", "personal", "large"
DEPLOYED = "deployed"
#: SHA-256 of the site file of the model it evaluated, when that model lives at the site
DEPLOYED_SHA256 = "deployed_sha256"
PHASE = "phase"
#: where the hospital's data came from, and a fingerprint of it (sent by every hospital)
DATA_SOURCE = "data_source"
DATA_FINGERPRINT = "data_fingerprint"
#: after a DP-SGD exchange: ε this hospital has spent on its data set, all runs, at δ
DP_EPSILON = "dp_epsilon"
DP_DELTA = "dp_delta"
#: a hospital's answer to a statistics request, JSON (fedclinic.stats.request.SiteAnswer)
STATS = "stats"
#: secure aggregation answers: public keys (setup); encrypted shares and their recipients
#: (share-keys); the shares revealed and whose they are (unmask)
SECAGG_PK1 = "secagg-pk1"
SECAGG_PK2 = "secagg-pk2"
SECAGG_DESTINATIONS = "secagg-destinations"
SECAGG_CIPHERTEXTS = "secagg-ciphertexts"
SECAGG_OWNERS = "secagg-owners"
SECAGG_SHARES = "secagg-shares"

# ------------------------------------------------------------------- metrics (<- hospital)
NUM_EXAMPLES = "num-examples"
NUM_TRAIN = "num_train"
NUM_VAL = "num_val"
NUM_TEST = "num_test"
TRAIN_LOSS = "train_loss"
TRAIN_SECONDS = "train_seconds"
TRAIN_STEPS = "train_steps"
EVAL_SECONDS = "eval_seconds"
CLASS_COUNTS = "class_counts"


def model_round(server_round: int) -> int:
    """The round whose global model a message of ``server_round`` carries (0: initial)."""
    return server_round - 1


def final_round(rounds: int) -> int:
    """The server round of the final evaluation of a run of ``rounds`` rounds."""
    return rounds + 1
