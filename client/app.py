"""The hospital's ClientApp: validate the hospital config, load local data, answer the round.

It runs in the hospital's site worker (:mod:`fedclinic.worker`, loaded once per run) or,
where no worker serves, in the ``flwr-clientapp`` process the SuperNode starts per message
(the forwarder, :mod:`client.forwarder`, then calls it in process). Data
is read here and only here; what goes back is model weights, metrics, and where the data
came from (``data_source``, ``data_fingerprint``: counts and a content hash, nothing that
identifies a patient or names a file). A configuration or data problem is returned to the
coordinator as one line without site paths (:mod:`fedclinic.redact`); the site's log keeps
the full message.
"""

from __future__ import annotations

import traceback
from logging import ERROR, INFO
from typing import Any, cast

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from fedclinic import messages as keys
from fedclinic import secagg
from fedclinic.config import HospitalConfig, RunConfig, parse_hospital_config
from fedclinic.data import DataRequest, load_hospital_data
from fedclinic.errors import FedClinicError
from fedclinic.privacy import (
    dataset_hash,
    plan_round,
    prior_step,
    release_class_counts,
    released_class_counts,
)
from fedclinic.redact import shareable
from fedclinic.serialization import from_wire, packed, to_wire, unpacked
from fedclinic.site import SiteState
from fedclinic.stats.protocol import normalisation_of, parse_request
from fedclinic.stats.site import describe
from fedclinic.training import select_device
from strategies import get_algorithm, load_run_config
from strategies.base import ClientContext

app = ClientApp()


def answer(message: Message, context: Context, train: bool | None) -> Message:
    """Build the algorithm's client objective for this message and let it respond.

    ``train`` is True for a training round, False for an evaluate-only exchange and None
    for the one-time setup query.
    """
    hospital: HospitalConfig | None = None
    try:
        run = load_run_config(context.run_config)
        hospital = parse_hospital_config(context.node_config)
        records = message.content.config_records
        config: dict[str, Any] = dict(records[keys.CONFIG]) if keys.CONFIG in records else {}
        server_round = int(config.get(keys.SERVER_ROUND, 0))
        if keys.STATS_REQUEST in config:  # a statistics exchange (fedclinic.stats)
            return Message(content=statistics(run, hospital, config), reply_to=message)
        stage = config.get(keys.SECAGG_STAGE)
        if stage in secagg.KEY_STAGES:  # secure aggregation's key stages: no data, no model
            site = SiteState.for_run(hospital, run, context.run_id, server_round=server_round,
                                     site_key=str(config.get(keys.SITE_KEY, "")))  # fmt: skip
            payload = secagg.site_stage(site.directory, server_round, config)
            info = ConfigRecord({keys.HOSPITAL: hospital.hospital, **payload})
            return Message(content=RecordDict({keys.INFO: info}), reply_to=message)
        data = load_hospital_data(DataRequest(run, hospital, normalisation_of(run, config)))
        client_context = ClientContext(
            run=run,
            hospital=hospital,
            data=data,
            device=select_device(hospital.device),
            site=SiteState.for_run(
                hospital,
                run,
                context.run_id,
                server_round=server_round,
                site_key=str(config.get(keys.SITE_KEY, "")),
            ),
            server_round=server_round,
            server_config=config,
        )
        objective = get_algorithm(run.algorithm).objective(client_context)
        fingerprint = objective.data_fingerprint()
        charge = None
        if train:  # the hospital's own privacy rules, before any step (fedclinic.privacy)
            dataset = dataset_hash(fingerprint)
            site = client_context.site
            prior = run.dp != "off" and objective.uses_class_prior
            released = released_class_counts(site, dataset) if prior else None
            pending = (prior_step(run),) if prior and released is None else ()
            charge = plan_round(
                run, hospital, dataset, len(data.train), objective.private_models, pending
            )
            if prior:  # the balanced softmax's class counts: a DP release, once per run
                client_context.released_counts = released or release_class_counts(
                    run, hospital, site, dataset, data.train.class_counts(run.num_classes),
                    context.run_id,
                )  # fmt: skip
        if train is None:
            content = objective.query(message.content)
        else:
            received = widened(message.content, run.wire_dtype)
            content = objective.respond(received, train=train)
        if train and keys.ARRAYS in content and run.secure_aggregation:
            if stage != secagg.COLLECT:
                raise secagg.SecAggError(
                    "secure aggregation: this run uploads masked updates only; a training "
                    "message without the collect stage is refused"
                )
            content[keys.ARRAYS] = secagg.mask_upload(
                client_context.site.directory,
                server_round,
                config,
                received.array_records[keys.ARRAYS],
                content.array_records[keys.ARRAYS],
                1 if config.get(keys.SECAGG_WEIGHTING) == "equal" else len(data.train),
                hospital.hospital,
            )
        elif train is not None and keys.ARRAYS in content.array_records:
            # the update, narrowed and packed for the wire
            update = to_wire(content.array_records[keys.ARRAYS], run.wire_dtype)
            content[keys.ARRAYS] = packed(update)
        # the objective's own info record, a ConfigRecord by the protocol (fedclinic.messages)
        info = cast(ConfigRecord, content[keys.INFO]) if keys.INFO in content else ConfigRecord()
        if charge is not None and keys.ARRAYS in content:  # trained: the ledger's line
            steps = content.metric_records[keys.METRICS].get(keys.TRAIN_STEPS, charge.steps)
            entry = charge.record(
                context.run_id,
                run.run_name,
                server_round,
                str(config.get(keys.EXCHANGE, "train")),
                # every model trained on the data takes the round's steps (plan_round)
                int(steps) * objective.private_models
                if isinstance(steps, int | float)
                else charge.steps,
            )
            info[keys.DP_EPSILON] = entry.epsilon_total
            info[keys.DP_DELTA] = entry.delta
            log(
                INFO,
                "fedclinic hospital %s: DP round %d: ε %.3f this round, %.3f in total on %s",
                hospital.hospital, server_round, entry.epsilon_round, entry.epsilon_total,
                entry.dataset[:12],
            )  # fmt: skip
        # Every reply says what the hospital trained and was tested on (results record it).
        info[keys.DATA_SOURCE] = hospital.data_source
        info[keys.DATA_FINGERPRINT] = fingerprint
        content[keys.INFO] = info
    except Exception as err:  # nothing unexpected may carry a site path off-site either
        name = str(context.node_config.get("hospital", f"node-{context.node_id}"))
        if isinstance(err, FedClinicError):
            log(ERROR, "fedclinic hospital %s: %s", name, err)
            sent = shareable(err, hospital)
        else:
            log(ERROR, "fedclinic hospital %s: %s", name, traceback.format_exc())
            sent = f"{type(err).__name__} at the hospital: {shareable(err, hospital)}"
        content = RecordDict({"info": ConfigRecord({"hospital": name, "error": sent})})
    return Message(content=content, reply_to=message)


def widened(content: RecordDict, wire_dtype: str) -> RecordDict:
    """The message's content with the model unpacked and widened back to float32
    (``wire-dtype``); a new RecordDict, so the message itself is left as it arrived."""
    if keys.ARRAYS not in content.array_records:
        return content
    arrays = content.array_records[keys.ARRAYS]
    received = from_wire(unpacked(arrays), wire_dtype)
    if received is arrays:
        return content
    copy = RecordDict(dict(content.items()))
    copy[keys.ARRAYS] = received
    return copy


def statistics(run: RunConfig, hospital: HospitalConfig, config: dict[str, Any]) -> RecordDict:
    """Answer a statistics request on the raw data, the hospital's privacy rules applied
    (:mod:`fedclinic.stats.site`). No data fingerprint: its exact counts would undo them."""
    request = parse_request(str(config[keys.STATS_REQUEST]))
    log(INFO, "fedclinic hospital %s: statistics request: %s", hospital.hospital, request.summary())
    data = load_hospital_data(DataRequest(run, hospital, "raw"))
    answer = describe(data, run, hospital, request)
    info = ConfigRecord(
        {
            keys.HOSPITAL: hospital.hospital,
            keys.DATA_SOURCE: hospital.data_source,
            keys.STATS: answer.model_dump_json(),
        }
    )
    return RecordDict({keys.INFO: info})


@app.train()
def train(message: Message, context: Context) -> Message:
    return answer(message, context, train=True)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return answer(message, context, train=False)


@app.query()
def query(message: Message, context: Context) -> Message:
    return answer(message, context, train=None)
