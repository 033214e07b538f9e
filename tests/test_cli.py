"""The ``fedclinic`` CLI: config merging and validation happen before anything starts."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from flwr.common.config import parse_config_args

from fedclinic.cli import COMMANDS, HelpFormatter, build_parser, main
from fedclinic.config import load_toml, parse_hospital_config
from fedclinic.errors import ConfigError
from fedclinic.local.command import build_local_options, default_output_dir
from fedclinic.local.configs import (
    app_defaults,
    dump_flat_toml,
    find_app_dir,
    merge_run_config,
    parse_assignment,
    synthetic_hospitals,
    write_flat_toml,
)
from fedclinic.pki import split_sans

ROOT = Path(__file__).resolve().parents[1]


def local_args(*argv: str) -> argparse.Namespace:
    return build_parser("local").parse_args(["local", *argv])


def run_failing(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str) -> str:
    """Run ``fedclinic local``, expect exit 2 with one ``error:`` line and nothing started."""
    out = tmp_path / "out"
    code = main(["local", "--output-dir", str(out), *argv])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert not (out / "federation").exists()  # nothing was started or written
    return lines[0]


# ---------------------------------------------------------------------------- run config


def test_defaults_come_from_pyproject() -> None:
    defaults = app_defaults(find_app_dir())
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert defaults["rounds"] == table["rounds"]
    assert "fedprox.proximal-mu" in defaults


def test_file_then_set_override_defaults(tmp_path: Path) -> None:
    run_file = tmp_path / "run.toml"
    run_file.write_text("rounds = 7\nlocal-epochs = 2\n[fedprox]\nproximal-mu = 0.5\n")
    argv = ["--run-config", str(run_file), "--set", "rounds=4", "--set", "learning-rate=1"]
    options = build_local_options(local_args(*argv, "--output-dir", str(tmp_path / "out")))
    config = options.run_config
    assert config["rounds"] == 4  # --set wins over the file
    assert config["local-epochs"] == 2  # the file wins over the defaults
    assert config["fedprox.proximal-mu"] == 0.5  # nested tables flatten like Flower's
    assert config["learning-rate"] == 1.0 and isinstance(config["learning-rate"], float)
    assert config["output-dir"] == str((tmp_path / "out").resolve())
    assert options.rounds == 4
    assert options.tls and options.node_auth


def test_parse_assignment_types() -> None:
    assert parse_assignment("rounds=5") == ("rounds", 5)
    assert parse_assignment("amp=true") == ("amp", True)
    assert parse_assignment("learning-rate=1e-3") == ("learning-rate", 0.001)
    assert parse_assignment("algorithm=fedprox") == ("algorithm", "fedprox")
    assert parse_assignment('algorithm="fedprox"') == ("algorithm", "fedprox")
    assert parse_assignment("data-path=/a b/c") == ("data-path", "/a b/c")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignment("rounds")


def test_string_defaults_keep_strings() -> None:
    merged = merge_run_config({"run-name": "", "rounds": 3}, None, ["run-name=42"])
    assert merged["run-name"] == "42"


def test_run_toml_round_trips_through_flower(tmp_path: Path) -> None:
    defaults = app_defaults(find_app_dir())
    path = write_flat_toml(tmp_path / "run.toml", merge_run_config(defaults, None, ["rounds=2"]))
    assert parse_config_args([str(path)]) == {**defaults, "rounds": 2}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--set", "rounds=0"], "rounds"),
        (["--set", "roundz=2"], "roundz"),
        (["--set", "rounds"], "KEY=VALUE"),
        (["--set", "algorithm=nope"], "algorithm"),
        (["--set", "fedprox.proximal-mu=-1"], "proximal-mu"),
        (["--set", "min-hospitals=5", "--hospitals", "2"], "min-hospitals"),
        (["--set", "data-source=medmnist"], "data-source"),
        (["--hospitals", "0"], "--hospitals"),
        (["--timeout", "0"], "--timeout"),
        (["--run-config", "/does/not/exist.toml"], "does not exist"),
    ],
)
def test_config_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], needle: str
) -> None:
    assert needle in run_failing(capsys, tmp_path, *argv)


def test_invalid_run_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [1, 2\n")
    assert "not valid TOML" in run_failing(capsys, tmp_path, "--run-config", str(bad))
    bad.write_text('optimizer = "adagrad"\n')
    assert "optimizer" in run_failing(capsys, tmp_path, "--run-config", str(bad))


def test_invalid_hospital_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "h.toml"
    bad.write_text('hospital = "st mary"\n')  # space not allowed
    line = run_failing(capsys, tmp_path, "--hospital", str(bad), "--set", "min-hospitals=1")
    assert "hospital" in line and str(bad) in line
    bad.write_text('hospital = "a"\ndata-source = "synthetic"\ndevic = "cpu"\n')
    assert "did you mean" in run_failing(
        capsys, tmp_path, "--hospital", str(bad), "--set", "min-hospitals=1"
    )


def test_duplicate_hospitals(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    one, two = tmp_path / "one.toml", tmp_path / "two.toml"
    one.write_text('hospital = "same"\ndata-source = "synthetic"\n')
    two.write_text('hospital = "same"\ndata-source = "synthetic"\n')
    assert "unique" in run_failing(capsys, tmp_path, "--hospital", str(one), "--hospital", str(two))


def test_hospital_and_hospitals_exclusive(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    one = tmp_path / "one.toml"
    one.write_text('hospital = "one"\ndata-source = "synthetic"\n')
    line = run_failing(
        capsys, tmp_path, "--hospital", str(one), "--hospitals", "2", "--set", "min-hospitals=1"
    )
    assert "not both" in line


def test_output_dir_with_results_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    assert "already holds a run" in run_failing(capsys, tmp_path)


def test_default_output_dir(tmp_path: Path) -> None:
    first = default_output_dir("fedavg", tmp_path)
    assert first.parent == (tmp_path / "runs").resolve() and first.name.endswith("-fedavg")
    first.mkdir(parents=True)
    second = default_output_dir("fedavg", tmp_path)
    assert second != first and second.name.startswith(first.name)


def test_insecure_implies_no_node_auth(tmp_path: Path) -> None:
    options = build_local_options(local_args("--insecure", "--output-dir", str(tmp_path)))
    assert not options.tls and not options.node_auth
    options = build_local_options(local_args("--no-node-auth", "--output-dir", str(tmp_path)))
    assert options.tls and not options.node_auth


# ---------------------------------------------------------------------------- hospitals


def test_generated_hospitals_validate_and_differ(tmp_path: Path) -> None:
    options = build_local_options(local_args("--hospitals", "4", "--output-dir", str(tmp_path)))
    specs = options.hospitals
    assert [s.name for s in specs] == ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
    sizes = [s.config.num_samples for s in specs]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    assert len({s.config.acquisition_shift for s in specs}) == 4
    state_dirs = {s.config.state_dir for s in specs}
    assert len(state_dirs) == 4
    # beside the work dir (remade at each start), so that --resume finds the site state
    assert all(Path(d).is_relative_to(tmp_path.resolve() / "hospital-state") for d in state_dirs)


def test_generated_hospital_tomls_validate_as_flower_reads_them(tmp_path: Path) -> None:
    """Written as the SuperNode's ``--node-config`` file, read back by Flower and by us."""
    for spec in synthetic_hospitals(3, tmp_path / "state"):
        path = write_flat_toml(tmp_path / f"{spec.name}.toml", spec.flat)
        node_config = parse_config_args([str(path)])  # what the SuperNode does
        assert node_config == spec.flat
        assert parse_hospital_config(node_config) == spec.config
        assert parse_hospital_config(load_toml(path, "hospital config")) == spec.config


def test_default_is_three_hospitals(tmp_path: Path) -> None:
    options = build_local_options(local_args("--output-dir", str(tmp_path)))
    assert len(options.hospitals) == 3


def test_toml_writer_escapes() -> None:
    flat = {"a.b": 'quote " back \\ tab \t é', "n": -1, "f": 1e-5, "t": True}
    assert tomllib.loads(dump_flat_toml(flat)) == flat


# ---------------------------------------------------------------------------- certs


def test_certs_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "pki"
    argv = ["certs", "--out", str(out), "--hospital", "st-mary", "--hospital", "county"]
    argv += ["--san", "coordinator.example.org", "--san", "10.0.0.5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "st-mary" in printed and "fingerprint" in printed
    for name in ("ca.crt", "ca.key", "server.pem", "server.key"):
        assert (out / name).is_file()
    for name in ("st-mary", "county"):
        assert (out / "hospitals" / f"{name}.key").is_file()
        assert (out / "hospitals" / f"{name}.pub").is_file()
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "coordinator.example.org"}
    assert ipaddress.ip_address("10.0.0.5") in sans.get_values_for_type(x509.IPAddress)
    # A second run must not replace keys hospitals already hold.
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_split_sans() -> None:
    dns, ips = split_sans(["a.example", "10.0.0.1", "localhost", "::1"])
    assert dns == ["localhost", "a.example"]
    assert ips == ["127.0.0.1", "::1", "10.0.0.1"]


def test_resume_says_what_is_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "does not exist (is it a run's output dir?)" in run_failing(capsys, tmp_path, "--resume")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"rounds": 2, "output-dir": str(out)}))
    line = run_failing(capsys, tmp_path, "--resume")
    assert "checkpoint.pkl' does not exist" in line
    (out / "config.json").write_text("{not json")
    assert "is unreadable" in run_failing(capsys, tmp_path, "--resume")
    code = main(["local", "--resume"])
    assert code == 2 and "--resume needs --output-dir" in capsys.readouterr().err


# ---------------------------------------------------------------------------- issue 17.10


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == "fedclinic 0.1.0"


def all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every subcommand's parser, nested ones included, as the user reaches them."""
    found: list[tuple[str, argparse.ArgumentParser]] = []

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        found.append((prefix, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(f"{prefix} {name}", sub)

    for command in COMMANDS:
        parser = build_parser(command)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        walk(f"fedclinic {command}", sub.choices[command])
    return found


def test_every_option_has_help_and_shows_its_default() -> None:
    missing, hidden = [], []
    for where, parser in all_parsers():
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            name = f"{where} {action.option_strings[-1]}"
            if not action.help:
                missing.append(name)
            elif action.default not in (None, [], False, argparse.SUPPRESS) and "default" not in (
                HelpFormatter(where)._get_help_string(action) or ""
            ):
                hidden.append(name)
        assert "%(default)" not in text
    assert not missing, f"options without help: {missing}"
    assert not hidden, f"defaults not shown: {hidden}"


def test_the_options_the_issue_named_say_what_they_default_to() -> None:
    helps = {where: parser.format_help() for where, parser in all_parsers()}
    hospital = " ".join(helps["fedclinic hospital"].split())
    for option, default in (("--ca", "/certs/ca.crt"), ("--key", "/keys/hospital.key"),
                            ("--config", "/config/hospital.toml")):  # fmt: skip
        assert f"container: {default}" in hospital, option
    assert "(default: 86400.0)" in " ".join(helps["fedclinic submit"].split())
    assert "--out DIR" in helps["fedclinic certs"]


def test_help_does_not_import_torch() -> None:
    """``fedclinic --help`` (and the commands declared in fedclinic.cli) answer without
    importing torch: measured with ``python -X importtime``, which lists every import."""
    for argv in (["--help"], ["local", "--help"], ["certs", "--help"], ["hospital", "--help"]):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "fedclinic.cli", *argv],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
        assert "torch" not in imported and "fedclinic.local.federation" not in imported, argv
        assert "usage: fedclinic" in done.stdout


def test_one_error_wrapper_for_every_command(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A ConfigError is exit 2, an OSError exit 1; each one line."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        code = main(["certs", "--out", str(tmp_path / "ro" / "pki")])
    finally:
        (tmp_path / "ro").chmod(0o700)
    err = capsys.readouterr().err.strip()
    if os.geteuid() != 0:  # root writes anywhere
        assert code == 2 and "cannot write to" in err and "\n" not in err
    code = main(["certs", "--fingerprint", str(tmp_path / "absent.crt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "absent.crt" in err
