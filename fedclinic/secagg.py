"""Secure aggregation (SecAgg+, Bell et al., arXiv 2005.00781, section 3; Bonawitz et al.,
arXiv 1611.04482, section 4): the coordinator learns only the sum of the hospitals' clipped,
quantised, sample-weighted updates, never one hospital's.

This module is both halves' shared arithmetic and the hospital's side of the four stages;
the coordinator's side is :mod:`fedclinic.engine.secagg` (docs/privacy.md, section 7). Every
cryptographic primitive is Flower's (``flwr.common.secure_aggregation``: Shamir sharing,
ECDH + HKDF key agreement, Fernet encryption, stochastic quantisation; ``flwr.supercore.
primitives.asymmetric``: the key pairs) or the ``cryptography`` package's: the masks are
AES-256 in counter mode keyed by the 32-byte seed (a PRG as in Bonawitz et al., section 4),
not Flower's ``pseudo_rand_gen``, which folds its seed to 32 bits (2^32 candidate masks).

Stages of one round, each an exchange of the round engine (retried and re-sent like any):

1. ``setup``: the hospital makes two fresh key pairs (one for the pairwise masks, one to
   encrypt shares) and sends both public keys.
2. ``share-keys``: it receives its neighbours' public keys (secure IDs 1..n), draws its
   private mask seed ``b`` and Shamir-shares ``b`` and its mask secret key among the
   neighbours (threshold ``t``), each share encrypted to its recipient.
3. ``collect`` (the training exchange): it receives the shares addressed to it, trains, and
   uploads ``y = n_k * Q(clip(w_k - w)) || n_k + PRG(b) + sum_v ±PRG(s_kv)`` modulo 2^64.
4. ``unmask``: for each neighbour it reveals either the share of ``b`` (the neighbour
   uploaded) or of its mask secret key (it dropped), never both.

The hospital keeps its secrets for the round in its own state dir (``secagg/``, mode 0600),
answers a repeated message of a stage with the answer it gave, and refuses a stage asked
again with other inputs (a coordinator asking for both kinds of share of one neighbour).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any, cast

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.app import ArrayRecord
from flwr.common import log
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedclinic import messages as keys
from fedclinic.errors import FedClinicError
from fedclinic.serialization import numpy_to_record, record_to_numpy

SETUP, SHARE_KEYS, COLLECT, UNMASK = "setup", "share-keys", "collect", "unmask"
#: stages answered without data or training (the hospital's handler short-cuts them)
KEY_STAGES = (SETUP, SHARE_KEYS, UNMASK)
#: the masked vector's entry that carries the hospital's weight n_k
WEIGHT_ENTRY = "secagg.weight"
#: a hospital's weight above this is refused: with at most MAX_HOSPITALS hospitals and a
#: quantisation range below 2^31 the masked sum stays below the modulus 2^64
MAX_WEIGHT = 2**24
MAX_HOSPITALS = 512
STATE_FOLDER = "secagg"


class SecAggError(FedClinicError):
    """A secure-aggregation stage cannot go on; one line for the coordinator."""


# ------------------------------------------------------------------------------ arithmetic
def mask(seed: bytes, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Uniform uint64 masks for entries of ``shapes`` (in that order) from a 32-byte seed:
    AES-256-CTR keystream (the seed is used for one vector only: keys are fresh per round)."""
    if len(seed) != 32:
        raise ValueError("a mask seed has 32 bytes")
    total = sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = np.frombuffer(encryptor.update(bytes(8 * total)), dtype="<u8")
    out, at = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = stream[at : at + size].reshape(shape).astype(np.uint64)
        at += size
    return out


def pair_seed(own_secret: bytes, their_public: bytes) -> bytes:
    """The pairwise mask seed of two hospitals: ECDH of one's secret and the other's public
    mask key, through HKDF-SHA256 (Flower's ``generate_shared_key``); symmetric."""
    key = generate_shared_key(bytes_to_private_key(own_secret), bytes_to_public_key(their_public))
    return base64.urlsafe_b64decode(key)


def quantise_weighted(
    update: Mapping[str, np.ndarray], weight: int, clipping: float, levels: int, seed: bytes
) -> tuple[dict[str, np.ndarray], float]:
    """``weight * Q(clip(update))`` as uint64, and the fraction of entries clipped.

    ``Q`` is Flower's stochastic quantisation of [-clipping, clipping] onto 0..levels; its
    rounding draws come from ``seed`` (the hospital's secret), so a repeated message
    quantises identically and two answers never differ by fresh rounding noise."""
    saved = np.random.get_state()
    np.random.seed(np.frombuffer(hashlib.sha256(b"rounding" + seed).digest(), dtype="<u4"))
    try:
        arrays = [np.asarray(v, dtype=np.float64) for v in update.values()]
        clipped = sum(int(np.count_nonzero(np.abs(a) > clipping)) for a in arrays)
        entries = sum(a.size for a in arrays)
        quantised = quantize(arrays, clipping, levels)
    finally:
        np.random.set_state(saved)
    out = {
        name: np.asarray(q, dtype=np.int64).astype(np.uint64) * np.uint64(weight)
        for name, q in zip(update, quantised, strict=True)
    }
    out[WEIGHT_ENTRY] = np.array([weight], dtype=np.uint64)
    return out, clipped / max(entries, 1)


def dequantise_mean(
    total: Mapping[str, np.ndarray], clipping: float, levels: int
) -> tuple[dict[str, np.ndarray], int]:
    """The sample-weighted mean update from the unmasked sum ``sum_k n_k Q(u_k) || sum_k n_k``
    (Flower's ``dequantize`` of the weighted mean level), and the total weight."""
    weight = int(total[WEIGHT_ENTRY][0])
    if weight <= 0:
        raise SecAggError("secure aggregation: the unmasked total weight is not positive")
    names = [k for k in total if k != WEIGHT_ENTRY]
    levels_mean = [total[k].astype(np.float64) / weight for k in names]
    # dequantize is affine (level x 2c/Q - c): it maps the mean level to the mean value
    values = dequantize(cast(list[Any], levels_mean), clipping, levels)
    return dict(zip(names, values, strict=True)), weight


def add(a: dict[str, np.ndarray], b: Mapping[str, np.ndarray], sign: int = 1) -> None:
    """``a += sign * b`` entrywise, modulo 2^64 (uint64 wraps)."""
    for name in a:
        if sign > 0:
            a[name] = a[name] + b[name]
        else:
            a[name] = a[name] - b[name]


# ------------------------------------------------------------------------------ site state
def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _unb64(value: str) -> bytes:
    return base64.b64decode(value)


@dataclass
class SiteSecrets:
    """What a hospital keeps between the stages of one round (never sent as is)."""

    server_round: int
    #: the coordinator's session of this round (a resumed coordinator starts a new one)
    session: str = ""
    sk1: str = ""  # private key for pairwise masks (base64 of Flower's bytes)
    pk1: str = ""
    sk2: str = ""  # private key for share encryption
    pk2: str = ""
    seed: str = ""  # private mask seed b
    own_id: int = 0
    #: secure ID -> (pk1, pk2) of every neighbour, own included
    public: dict[str, list[str]] = field(default_factory=dict)
    #: secure ID -> this hospital's share of that neighbour's b / mask secret key
    seed_shares: dict[str, str] = field(default_factory=dict)
    key_shares: dict[str, str] = field(default_factory=dict)
    #: stage -> (digest of its inputs, the answer given)
    answers: dict[str, list[Any]] = field(default_factory=dict)


def _state_file(site_dir: Path, server_round: int) -> Path:
    return site_dir / STATE_FOLDER / f"round-{server_round}.json"


def _load(site_dir: Path, server_round: int, config: Mapping[str, Any]) -> SiteSecrets:
    """This round's secrets for the message's session. A new session (the coordinator
    restarted the round after a crash) starts afresh, unless this hospital already revealed
    its unmask shares for the round: a second sum of the same updates over other hospitals
    would single out the difference, so that is refused."""
    session = str(config.get(keys.SECAGG_SESSION, ""))
    path = _state_file(site_dir, server_round)
    if not path.is_file():
        return SiteSecrets(server_round, session)
    secrets = SiteSecrets(**json.loads(path.read_text()))
    if secrets.session == session:
        return secrets
    if UNMASK in secrets.answers:
        raise SecAggError(
            f"secure aggregation: round {server_round} was already unmasked in another "
            "session; a second sum over other hospitals could single out one update; refused"
        )
    return SiteSecrets(server_round, session)


def _save(site_dir: Path, secrets: SiteSecrets) -> None:
    """Atomically, readable by the hospital's user only; older rounds' files are removed."""
    folder = site_dir / STATE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = _state_file(site_dir, secrets.server_round)
    temporary = path.with_suffix(".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(asdict(secrets), handle)
    os.replace(temporary, path)
    for old in folder.glob("round-*.json"):
        number = old.stem.removeprefix("round-")
        if number.isdigit() and int(number) < secrets.server_round:
            old.unlink(missing_ok=True)


def _digest(config: Mapping[str, Any], names: tuple[str, ...]) -> str:
    hashed = hashlib.sha256()
    for name in names:
        value = config.get(name)
        items = value if isinstance(value, list) else [value]
        hashed.update(name.encode() + b"=")
        for item in items:
            hashed.update(item if isinstance(item, bytes) else repr(item).encode())
            hashed.update(b",")
    return hashed.hexdigest()


_INPUTS = {
    SETUP: (keys.SECAGG_THRESHOLD,),
    SHARE_KEYS: (keys.SECAGG_ID, keys.SECAGG_IDS, keys.SECAGG_PK1, keys.SECAGG_PK2),
    COLLECT: (keys.SECAGG_SOURCES, keys.SECAGG_CIPHERTEXTS),
    UNMASK: (keys.SECAGG_ACTIVE, keys.SECAGG_DEAD),
}


def _repeat(secrets: SiteSecrets, stage: str, config: Mapping[str, Any]) -> Any:
    """The answer already given to this stage (a repeated message), or ``None``; a stage
    asked again with other inputs is refused."""
    digest = _digest(config, _INPUTS[stage])
    if stage in secrets.answers:
        given_digest, answer = secrets.answers[stage]
        if given_digest != digest:
            raise SecAggError(
                f"secure aggregation: round {secrets.server_round}'s {stage} stage was asked "
                "again with other inputs; refused (the answer could reveal more)"
            )
        return answer
    return None


def _remember(secrets: SiteSecrets, stage: str, config: Mapping[str, Any], answer: Any) -> None:
    secrets.answers[stage] = [_digest(config, _INPUTS[stage]), answer]


# ------------------------------------------------------------------------------ site stages
def site_stage(site_dir: Path, server_round: int, config: Mapping[str, Any]) -> dict[str, Any]:
    """The hospital's answer to a ``setup``, ``share-keys`` or ``unmask`` message, for its
    reply's info record."""
    stage = str(config[keys.SECAGG_STAGE])
    secrets = _load(site_dir, server_round, config)
    given = _repeat(secrets, stage, config)
    if given is not None:
        return _decode_answer(given)
    if stage == SETUP:
        answer = _setup(secrets)
    elif stage == SHARE_KEYS:
        answer = _share_keys(secrets, config)
    elif stage == UNMASK:
        answer = _unmask(secrets, config)
    else:
        raise SecAggError(f"secure aggregation: unknown stage {stage!r}")
    _remember(secrets, stage, config, _encode_answer(answer))
    _save(site_dir, secrets)
    return answer


def _encode_answer(answer: Mapping[str, Any]) -> dict[str, Any]:
    def encode(value: Any) -> Any:
        if isinstance(value, bytes):
            return {"b": _b64(value)}
        if isinstance(value, list):
            return [encode(v) for v in value]
        return value

    return {k: encode(v) for k, v in answer.items()}


def _decode_answer(answer: Mapping[str, Any]) -> dict[str, Any]:
    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            return _unb64(value["b"])
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    return {k: decode(v) for k, v in answer.items()}


def _setup(secrets: SiteSecrets) -> dict[str, Any]:
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    secrets.sk1, secrets.pk1 = _b64(private_key_to_bytes(sk1)), _b64(public_key_to_bytes(pk1))
    secrets.sk2, secrets.pk2 = _b64(private_key_to_bytes(sk2)), _b64(public_key_to_bytes(pk2))
    return {keys.SECAGG_PK1: _unb64(secrets.pk1), keys.SECAGG_PK2: _unb64(secrets.pk2)}


def _share_keys(secrets: SiteSecrets, config: Mapping[str, Any]) -> dict[str, Any]:
    if not secrets.sk1:
        raise SecAggError("secure aggregation: share-keys before setup in this round")
    own = int(config[keys.SECAGG_ID])
    ids = [int(i) for i in config[keys.SECAGG_IDS]]
    pk1s, pk2s = list(config[keys.SECAGG_PK1]), list(config[keys.SECAGG_PK2])
    threshold = int(config[keys.SECAGG_THRESHOLD])
    if not len(ids) == len(pk1s) == len(pk2s) or len(set(ids)) != len(ids):
        raise SecAggError("secure aggregation: malformed neighbour list")
    if len(ids) < threshold or threshold < 2:
        raise SecAggError(
            f"secure aggregation: {len(ids)} neighbours (with this hospital) cannot carry a "
            f"threshold of {threshold}"
        )
    if len(set(pk1s) | set(pk2s)) != 2 * len(ids):
        raise SecAggError("secure aggregation: two neighbours sent the same public key")
    public = {i: (a, b) for i, a, b in zip(ids, pk1s, pk2s, strict=True)}
    if own not in public or public[own] != (_unb64(secrets.pk1), _unb64(secrets.pk2)):
        raise SecAggError("secure aggregation: this hospital's public keys were not relayed")
    secrets.own_id = own
    secrets.public = {str(i): [_b64(a), _b64(b)] for i, (a, b) in public.items()}
    seed = os.urandom(32)
    secrets.seed = _b64(seed)
    sk1 = _unb64(secrets.sk1)
    seed_shares = create_shares(seed, threshold, len(ids))
    key_shares = create_shares(sk1, threshold, len(ids))
    destinations, ciphertexts = [], []
    for index, neighbour in enumerate(sorted(public)):
        if neighbour == own:
            secrets.seed_shares[str(own)] = _b64(seed_shares[index])
            secrets.key_shares[str(own)] = _b64(key_shares[index])
            continue
        channel = generate_shared_key(
            bytes_to_private_key(_unb64(secrets.sk2)), bytes_to_public_key(public[neighbour][1])
        )
        plaintext = share_keys_plaintext_concat(
            own, neighbour, seed_shares[index], key_shares[index]
        )
        destinations.append(neighbour)
        ciphertexts.append(encrypt(channel, plaintext))
    return {keys.SECAGG_DESTINATIONS: destinations, keys.SECAGG_CIPHERTEXTS: ciphertexts}


def masked_update(
    site_dir: Path,
    server_round: int,
    config: Mapping[str, Any],
    update: Mapping[str, np.ndarray],
    weight: int,
    hospital: str = "",
) -> dict[str, np.ndarray]:
    """Stage ``collect``: store the shares addressed to this hospital, then mask its
    weighted, quantised ``update`` (``w_k - w``) with its own mask and one pairwise mask per
    neighbour whose shares arrived. A repeated message gets the vector already sent."""
    secrets = _load(site_dir, server_round, config)
    folder = site_dir / STATE_FOLDER
    stored = folder / f"round-{server_round}.masked.npz"
    if _repeat(secrets, COLLECT, config) is not None and stored.is_file():  # same session
        with np.load(stored) as saved:
            return {name: saved[name] for name in saved.files}
    if not secrets.seed:
        raise SecAggError("secure aggregation: collect before share-keys in this round")
    if not 0 < weight <= MAX_WEIGHT:
        raise SecAggError(f"secure aggregation: weight {weight} outside 1..{MAX_WEIGHT}")
    sources = [int(s) for s in config.get(keys.SECAGG_SOURCES, [])]
    ciphertexts = list(config.get(keys.SECAGG_CIPHERTEXTS, []))
    threshold = int(config[keys.SECAGG_THRESHOLD])
    if len(sources) + 1 < threshold:
        raise SecAggError(
            f"secure aggregation: only {len(sources)} neighbour(s) shared keys; the threshold "
            f"is {threshold}"
        )
    own, sk2 = secrets.own_id, _unb64(secrets.sk2)
    for source, ciphertext in zip(sources, ciphertexts, strict=True):
        if str(source) not in secrets.public or source == own:
            raise SecAggError(f"secure aggregation: shares from unknown neighbour {source}")
        channel = generate_shared_key(
            bytes_to_private_key(sk2), bytes_to_public_key(_unb64(secrets.public[str(source)][1]))
        )
        sender, receiver, seed_share, key_share = share_keys_plaintext_separate(
            decrypt(channel, ciphertext)
        )
        if sender != source or receiver != own:
            raise SecAggError("secure aggregation: a share was relayed to the wrong hospital")
        secrets.seed_shares[str(source)] = _b64(seed_share)
        secrets.key_shares[str(source)] = _b64(key_share)
    seed = _unb64(secrets.seed)
    clipping = float(config[keys.SECAGG_CLIPPING])
    levels = int(config[keys.SECAGG_LEVELS])
    vector, clipped = quantise_weighted(update, weight, clipping, levels, seed)
    shapes = {name: v.shape for name, v in vector.items()}
    add(vector, mask(seed, shapes))
    sk1 = _unb64(secrets.sk1)
    for neighbour in sources:  # the ones that shared keys: they mask with this one too
        pairwise = mask(pair_seed(sk1, _unb64(secrets.public[str(neighbour)][0])), shapes)
        add(vector, pairwise, 1 if own > neighbour else -1)
    log(INFO, "fedclinic hospital %s: secure aggregation round %d: update masked with %d "
        "pairwise mask(s); %.2f%% of its entries clipped to ±%g", hospital, server_round,
        len(sources), 100 * clipped, clipping)  # fmt: skip
    _remember(secrets, COLLECT, config, {"masked": True})
    folder.mkdir(parents=True, exist_ok=True)
    with stored.open("wb") as handle:
        cast(Any, np.savez)(handle, **vector)  # numpy's stub mistypes **arrays
    for old in folder.glob("round-*.masked.npz"):
        if old != stored:
            old.unlink(missing_ok=True)
    _save(site_dir, secrets)
    return vector


def _unmask(secrets: SiteSecrets, config: Mapping[str, Any]) -> dict[str, Any]:
    active = [int(i) for i in config[keys.SECAGG_ACTIVE]]
    dead = [int(i) for i in config[keys.SECAGG_DEAD]]
    if set(active) & set(dead):
        raise SecAggError(
            "secure aggregation: asked for both kinds of share of one hospital; refused"
        )
    if COLLECT not in secrets.answers:
        raise SecAggError("secure aggregation: unmask before this hospital's masked upload")
    unknown = [i for i in active + dead if str(i) not in secrets.seed_shares]
    if unknown:
        raise SecAggError(f"secure aggregation: no shares of hospital(s) {unknown}")
    shares = [_unb64(secrets.seed_shares[str(i)]) for i in active]
    shares += [_unb64(secrets.key_shares[str(i)]) for i in dead]
    # what is no longer needed goes: the secret keys and the seed of this round
    secrets.sk1 = secrets.sk2 = secrets.seed = ""
    return {keys.SECAGG_OWNERS: active + dead, keys.SECAGG_SHARES: shares}


def mask_upload(
    site_dir: Path,
    server_round: int,
    config: Mapping[str, Any],
    received: ArrayRecord,
    trained: ArrayRecord,
    weight: int,
    hospital: str = "",
) -> ArrayRecord:
    """The training reply's arrays under secure aggregation: the masked vector of the
    update ``trained - received`` weighted by ``weight`` (:func:`masked_update`)."""
    start, end = record_to_numpy(received), record_to_numpy(trained)
    if set(start) != set(end):
        raise SecAggError("secure aggregation: the trained model's entries differ from the sent")
    update = {k: end[k].astype(np.float64) - start[k].astype(np.float64) for k in start}
    return numpy_to_record(masked_update(site_dir, server_round, config, update, weight, hospital))
