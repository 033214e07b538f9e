"""The coordinator's side of secure aggregation (SecAgg+, Bell et al., arXiv 2005.00781,
section 3): four exchanges per round instead of one, and the sum instead of the updates.

:class:`SecureAggregation` wraps an algorithm whose aggregation is a weighted mean of the
hospitals' models (FedAvg, FedProx, FedHelp: ``ServerAlgorithm.secure_aggregation_refusal``
is ``None``; ``secure_weighting`` says whether by sample count or equally); the algorithm
itself is unaware of it beyond those declarations. The round engine wraps the run's
algorithm when ``secure-aggregation = true`` (:mod:`fedclinic.engine.rounds`), so every
stage is an ordinary exchange with the engine's deadlines, re-sends and acceptance:

=================== ============ =================================================
exchange            message      the coordinator
=================== ============ =================================================
``secagg-setup``    QUERY        collects every hospital's two public keys
``secagg-share-keys`` QUERY      relays the keys of each one's neighbours; collects
                                 encrypted Shamir shares
``train``           TRAIN        relays each hospital its shares with the model; collects
                                 masked vectors (evaluate and train rows as usual)
``secagg-unmask``   QUERY        asks the survivors for the shares that remove the masks
=================== ============ =================================================

It then holds ``sum_k n_k Q(clip(w_k - w))`` and ``sum_k n_k`` and nothing else: the new
global model is ``w + dequantise(sum / sum n_k)``, which is FedAvg's ``sum_k n_k w_k / n``
of the clipped updates within the quantisation error. A hospital that drops after sharing
its keys is recovered from its neighbours' shares of its mask key when at least the
threshold of them answer; otherwise the round fails with that reason. The hospital's half
and the arithmetic are :mod:`fedclinic.secagg`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MessageType
from flwr.common import log
from flwr.common.secure_aggregation.crypto.shamir import combine_shares

from fedclinic import messages as keys
from fedclinic import secagg
from fedclinic.engine.algorithm import TRAIN, Exchange, Hospital, Reply, ServerAlgorithm
from fedclinic.errors import FedClinicError
from fedclinic.serialization import State, numpy_to_record, record_to_numpy

SETUP = Exchange("secagg-setup", MessageType.QUERY, evaluate=False, train=False)
SHARE_KEYS = Exchange("secagg-share-keys", MessageType.QUERY, evaluate=False, train=False)
UNMASK = Exchange("secagg-unmask", MessageType.QUERY, evaluate=False, train=False)
KEY_EXCHANGES = (SETUP.name, SHARE_KEYS.name, UNMASK.name)
STAGES = {SETUP.name: secagg.SETUP, SHARE_KEYS.name: secagg.SHARE_KEYS,
          TRAIN.name: secagg.COLLECT, UNMASK.name: secagg.UNMASK}  # fmt: skip


@dataclass
class _Round:
    """What the coordinator holds during one round: public values and the masked sum."""

    session: str = ""
    #: node -> secure ID (1..n), and back; public keys by secure ID (setup's answerers)
    ids: dict[int, int] = field(default_factory=dict)
    nodes: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    public: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    neighbours: dict[int, set[int]] = field(default_factory=dict)
    threshold: int = 0
    #: secure IDs that answered share-keys (U2) and uploaded a masked vector (U3)
    shared: set[int] = field(default_factory=set)
    uploaded: set[int] = field(default_factory=set)
    #: destination -> [(source, ciphertext)]
    inbox: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    total: dict[str, np.ndarray] | None = None
    #: the summed hospitals' replies, without their arrays (for the algorithm's rows)
    summed: list[Reply] = field(default_factory=list)


class SecureAggregation(ServerAlgorithm):
    """SecAgg+ around an algorithm that averages the uploaded models; see the module."""

    #: the uploads are masked vectors: the model's layout and norms cannot be checked (the
    #: per-entry clipping bounds what one hospital can move instead)
    checks_update_layout = False
    checks_update_norms = False

    def __init__(self, inner: ServerAlgorithm) -> None:
        super().__init__(inner.run, inner.results)
        reason = type(inner).secure_aggregation_refusal
        if reason is None and inner.exchanges(1) != (TRAIN,):
            reason = "it has more than one exchange per round"
        if reason is not None:
            raise FedClinicError(f"secure aggregation cannot wrap {type(inner).__name__}: {reason}")
        self.inner = inner
        self.current = _Round()
        self.sent: dict[str, np.ndarray] = {}
        #: per round: hospitals in the sum, and those recovered after dropping
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ delegated
    def initial_state(self) -> State:
        return self.inner.initial_state()

    def setup_query(self) -> dict[str, Any] | None:
        return self.inner.setup_query()

    def setup(self, replies: list[Reply], initial_arrays: ArrayRecord) -> None:
        self.inner.setup(replies, initial_arrays)

    def after_round(self, server_round: int, arrays: ArrayRecord) -> None:
        self.inner.after_round(server_round, arrays)

    def nodes_moved(self, moved: dict[int, int]) -> None:
        self.inner.nodes_moved(moved)

    def summary_extra(self) -> dict[str, Any]:
        return {**self.inner.summary_extra(), "secure_aggregation_rounds": self.history}

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        self.history = list(state.get("history", []))

    # ------------------------------------------------------------------ declarations
    def exchanges(self, server_round: int) -> tuple[Exchange, ...]:
        return (SETUP, SHARE_KEYS, TRAIN, UNMASK)

    def round_config(self, server_round: int, exchange: Exchange) -> dict[str, Any]:
        if exchange.name not in STAGES:  # the final evaluation
            return self.inner.round_config(server_round, exchange)
        if exchange.name == SETUP.name:
            self.current, self.sent = _Round(session=os.urandom(8).hex()), {}
        config: dict[str, Any] = {
            keys.SECAGG_STAGE: STAGES[exchange.name],
            keys.SECAGG_SESSION: self.current.session,
        }
        if exchange.name == SETUP.name:
            return config
        config[keys.SECAGG_THRESHOLD] = self.current.threshold
        if exchange.name == TRAIN.name:
            config.update(self.inner.round_config(server_round, exchange))
            config[keys.SECAGG_CLIPPING] = float(self.run.secagg_clipping_range)
            config[keys.SECAGG_LEVELS] = int(self.run.secagg_quantization_range)
            config[keys.SECAGG_WEIGHTING] = self.inner.secure_weighting()
        return config

    def arrays_for(
        self, hospital: Hospital, arrays: ArrayRecord, exchange: Exchange
    ) -> ArrayRecord:
        if exchange.name in KEY_EXCHANGES:
            return ArrayRecord()  # no model travels in the key stages
        if exchange.name == TRAIN.name and not self.sent:
            self.sent = record_to_numpy(arrays)
        return self.inner.arrays_for(hospital, arrays, exchange)

    def config_for(self, hospital: Hospital, config: ConfigRecord) -> ConfigRecord:
        stage = config.get(keys.SECAGG_STAGE)
        state, own = self.current, self.current.ids.get(hospital.node_id, 0)
        extra: dict[str, Any] = {}
        if stage == secagg.SHARE_KEYS:
            ring = sorted(state.neighbours[own])
            extra = {
                keys.SECAGG_ID: own,
                keys.SECAGG_IDS: ring,
                keys.SECAGG_PK1: [state.public[i][0] for i in ring],
                keys.SECAGG_PK2: [state.public[i][1] for i in ring],
            }
        elif stage == secagg.COLLECT:
            inbox = sorted(state.inbox.get(own, []))
            extra = {
                keys.SECAGG_SOURCES: [source for source, _ in inbox],
                keys.SECAGG_CIPHERTEXTS: [ciphertext for _, ciphertext in inbox],
            }
        elif stage == secagg.UNMASK:
            around = state.neighbours[own]
            extra = {
                keys.SECAGG_ACTIVE: sorted(around & state.uploaded),
                keys.SECAGG_DEAD: sorted(around & (state.shared - state.uploaded)),
            }
        if stage in (None, secagg.COLLECT):  # the training exchange, the final evaluation
            config = self.inner.config_for(hospital, config)
        return ConfigRecord({**dict(config), **extra})

    def check_update(self, reply: Reply, exchange: Exchange) -> str | None:
        """A masked vector has the model's entries and the weight, uint64, same shapes."""
        if exchange.name != TRAIN.name or reply.arrays is None:
            return None
        vector = record_to_numpy(reply.arrays)
        expected = {**{k: v.shape for k, v in self.sent.items()}, secagg.WEIGHT_ENTRY: (1,)}
        if set(vector) != set(expected):
            return "the masked update does not have the model's entries"
        for name, value in vector.items():
            if value.dtype != np.uint64 or value.shape != expected[name]:
                return f"the masked update's entry {name!r} is not a uint64 array of its shape"
        return None

    # ------------------------------------------------------------------ the stages
    def aggregate(
        self, server_round: int, replies: list[Reply], exchange: Exchange = TRAIN
    ) -> ArrayRecord | None:
        if exchange.name == SETUP.name:
            self._keys(server_round, replies)
        elif exchange.name == SHARE_KEYS.name:
            self._shares(server_round, replies)
        elif exchange.name == TRAIN.name:
            self._collect(server_round, replies)
        elif exchange.name == UNMASK.name:
            return self._unmask(server_round, replies)
        return None

    def _keys(self, server_round: int, replies: list[Reply]) -> None:
        state = self.current
        if len(replies) > secagg.MAX_HOSPITALS:
            raise FedClinicError(
                f"secure aggregation: {len(replies)} hospitals in round {server_round}, more "
                f"than the {secagg.MAX_HOSPITALS} the masked sum can hold"
            )
        for secure_id, reply in enumerate(sorted(replies, key=lambda r: r.node_id), start=1):
            state.ids[reply.node_id], state.nodes[secure_id] = secure_id, reply.node_id
            state.names[secure_id] = reply.hospital
            state.public[secure_id] = (
                bytes(reply.info[keys.SECAGG_PK1]),
                bytes(reply.info[keys.SECAGG_PK2]),
            )
        state.neighbours = neighbourhoods(
            sorted(state.public), self.run.secagg_num_shares, self.run.seed + server_round
        )
        smallest = min(len(ring) for ring in state.neighbours.values())
        state.threshold = self.run.secagg_reconstruction_threshold or max(2, smallest // 2 + 1)
        if state.threshold > smallest:
            raise FedClinicError(
                f"secure aggregation: round {server_round}: {len(replies)} hospital(s) "
                f"answered the setup, neighbourhoods of {smallest}; a secret needs "
                f"{state.threshold} shares (secagg-reconstruction-threshold)"
            )

    def _shares(self, server_round: int, replies: list[Reply]) -> None:
        state = self.current
        state.shared = {state.ids[r.node_id] for r in replies}
        for reply in replies:
            source = state.ids[reply.node_id]
            destinations = [int(d) for d in reply.info.get(keys.SECAGG_DESTINATIONS, [])]
            ciphertexts = [bytes(c) for c in reply.info.get(keys.SECAGG_CIPHERTEXTS, [])]
            for destination, ciphertext in zip(destinations, ciphertexts, strict=True):
                if destination in state.shared and destination in state.neighbours[source]:
                    state.inbox.setdefault(destination, []).append((source, ciphertext))
        state.shared, shared = set(), state.shared  # nobody dropped yet
        self._enough(server_round, shared, "shared their keys")
        state.shared = shared

    def _enough(self, server_round: int, alive: set[int], what: str) -> None:
        """Every hospital whose secrets the round may need must have ``threshold``
        neighbours in ``alive``, else the round fails now, naming who is missing."""
        state = self.current
        missing = sorted(state.names[i] for i in state.shared - alive) if state.shared else []
        for secure_id in sorted(state.shared or alive):
            left = state.neighbours[secure_id] & alive
            if len(left) < state.threshold:
                raise FedClinicError(
                    f"secure aggregation: round {server_round} cannot be unmasked: only "
                    f"{len(left)} of {state.names[secure_id]}'s neighbours {what}"
                    + (f" ({', '.join(missing)} dropped after sharing keys)" if missing else "")
                    + f"; its secrets need {state.threshold} shares "
                    "(secagg-reconstruction-threshold)"
                )

    def _collect(self, server_round: int, replies: list[Reply]) -> None:
        state = self.current
        state.uploaded = {state.ids[r.node_id] for r in replies}
        total: dict[str, np.ndarray] | None = None
        for reply in replies:
            assert reply.arrays is not None  # the engine accepts train replies with arrays
            vector = record_to_numpy(reply.arrays)
            if total is None:
                total = {k: v.astype(np.uint64) for k, v in vector.items()}
            else:
                secagg.add(total, vector)
        state.total = total
        self._enough(server_round, state.uploaded, "uploaded")
        # the masked vectors are not kept, only their sum
        for reply in replies:
            reply.arrays = None
        state.summed = list(replies)

    def _unmask(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        state = self.current
        if state.total is None:
            raise FedClinicError(f"secure aggregation: round {server_round}: nothing uploaded")
        answered = {state.ids[r.node_id] for r in replies}
        shares: dict[int, list[bytes]] = {}
        for reply in replies:
            owners = [int(o) for o in reply.info.get(keys.SECAGG_OWNERS, [])]
            given = [bytes(s) for s in reply.info.get(keys.SECAGG_SHARES, [])]
            for owner, share in zip(owners, given, strict=True):
                shares.setdefault(owner, []).append(share)
        dropped = state.shared - state.uploaded
        total, shapes = state.total, {k: v.shape for k, v in state.total.items()}
        for owner in sorted(state.shared):
            have = shares.get(owner, [])
            if len(have) < state.threshold:
                kind = "mask seed" if owner in state.uploaded else "mask key (it dropped)"
                raise FedClinicError(
                    f"secure aggregation: round {server_round} cannot be unmasked: "
                    f"{state.names[owner]}'s {kind} needs {state.threshold} shares "
                    f"(secagg-reconstruction-threshold), {len(have)} of its neighbours "
                    f"answered ({len(answered)} hospital(s) left of {len(state.shared)})"
                )
            secret = combine_shares(have[: state.threshold])
            if owner in state.uploaded:
                secagg.add(total, secagg.mask(secret, shapes), -1)
                continue
            for neighbour in sorted(state.neighbours[owner] & state.uploaded):
                seed = secagg.pair_seed(secret, state.public[neighbour][0])
                # the neighbour added the mask if its ID is larger, else subtracted it
                secagg.add(total, secagg.mask(seed, shapes), -1 if neighbour > owner else 1)
        mean, weight = secagg.dequantise_mean(
            total, self.run.secagg_clipping_range, self.run.secagg_quantization_range
        )
        recovered = sorted(state.names[i] for i in dropped)
        if recovered:
            log(WARNING, "round %d: secure aggregation recovered the masks of %s (dropped "
                "after sharing keys)", server_round, ", ".join(recovered))  # fmt: skip
        log(INFO, "round %d: secure aggregation of %d hospital(s) unmasked (total weight %d)",
            server_round, len(state.uploaded), weight)  # fmt: skip
        self.history.append(
            {
                "round": server_round,
                "summed": sorted(state.names[i] for i in state.uploaded),
                "recovered": recovered,
                "threshold": state.threshold,
                "total_weight": weight,
            }
        )
        self.inner.securely_aggregated(server_round, state.summed)
        sent, self.sent = self.sent, {}
        self.current = _Round()
        return numpy_to_record(apply_mean_update(sent, mean))


def apply_mean_update(
    sent: dict[str, np.ndarray], mean: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``w + mean update`` per entry in ``w``'s dtype (integer entries rounded)."""
    out = {}
    for name, value in sent.items():
        new = value.astype(np.float64) + mean[name]
        if np.issubdtype(value.dtype, np.integer):
            new = np.rint(new)
        out[name] = new.astype(value.dtype)
    return out


def neighbourhoods(ids: list[int], shares: int, seed: int) -> dict[int, set[int]]:
    """Each hospital's neighbours, itself included: everyone when ``shares`` is 0 or covers
    the round; else a ring of ``shares`` (made odd) around it in a shuffled order, as in
    Flower's SecAgg+ workflow (Bell et al., section 3: a k-regular graph)."""
    if shares == 0 or shares >= len(ids):
        return {i: set(ids) for i in ids}
    shares += 1 - shares % 2
    order = list(ids)
    random.Random(seed).shuffle(order)
    half = shares // 2
    return {
        node: {order[(at + offset) % len(order)] for offset in range(-half, half + 1)}
        for at, node in enumerate(order)
    }
