"""Plain ClientApp: train on TRAIN, evaluate on EVALUATE, each reporting its own compute time.

Data and training are fedclinic's (``load_hospital_data``, ``train_local``, ``evaluate``)
so the compute matches fedclinic's hospitals; only the message pattern differs.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.clientapp import ClientApp

from fedclinic.config import parse_hospital_config
from fedclinic.data import DataRequest, HospitalData, load_hospital_data
from fedclinic.training import evaluate, seeded_generator, select_device, train_local
from plain_flower_app.task import build, run_config

app = ClientApp()


def _setup(message: Message, context: Context) -> tuple[torch.nn.Module, HospitalData, int]:
    """The received model, this hospital's data and the round number."""
    hospital = parse_hospital_config(context.node_config)
    data = load_hospital_data(DataRequest(run_config(context.run_config), hospital))
    model = build(context.run_config)
    model.load_state_dict(message.content.array_records["arrays"].to_torch_state_dict())
    # a ConfigRecord value may be any of Flower's types; FedAvg's server-round is an int
    server_round = int(message.content.config_records["config"].get("server-round", 0))  # type: ignore[arg-type]
    return model, data, server_round


@app.train()
def train(message: Message, context: Context) -> Message:
    model, data, server_round = _setup(message, context)
    run = run_config(context.run_config)
    hospital = parse_hospital_config(context.node_config)
    generator = seeded_generator(run.seed, server_round, hospital.hospital)
    torch.manual_seed(int(generator.initial_seed() % (2**31)))
    stats = train_local(model, data.train, run, select_device(hospital.device), generator)
    metrics = MetricRecord(
        {
            "num-examples": stats.num_examples,
            "train_loss": stats.loss,
            "train_seconds": stats.seconds,
            "partition": hospital.partition_id,
        }
    )
    arrays = ArrayRecord(model.state_dict())
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)


@app.evaluate()
def evaluate_model(message: Message, context: Context) -> Message:
    model, data, _ = _setup(message, context)
    run = run_config(context.run_config)
    hospital = parse_hospital_config(context.node_config)
    device = select_device(hospital.device)
    started = time.perf_counter()
    scores = {
        **evaluate(model, data.val, device, run.num_classes, "val_", run.task),
        **evaluate(model, data.test, device, run.num_classes, "test_", run.task),
    }
    seconds = time.perf_counter() - started
    metrics: dict[str, MetricRecordValues] = {
        k: float(v) for k, v in scores.items() if isinstance(v, int | float)
    }
    metrics.update(
        {
            "num-examples": len(data.val) + len(data.test),
            "eval_seconds": seconds,
            "partition": hospital.partition_id,
        }
    )
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
