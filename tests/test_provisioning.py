"""Provisioning at a hospital: ``fedclinic certs --keys-only`` makes the site's key pair and
nothing else (no CA), and the public key's fingerprint is the one ``ssh-keygen -l`` prints,
so hospital and operator can compare it over another channel."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import fedclinic.certs as certs_command
from fedclinic.cli import main
from fedclinic.pki import ProvisioningError, public_key_fingerprint


def test_keys_only_writes_the_site_key_pair_and_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"
    assert main(["certs", "--out", str(out), "--keys-only", "--hospital", "st-mary"]) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["hospitals/st-mary.key", "hospitals/st-mary.pub"]
    assert stat.S_IMODE((out / "hospitals/st-mary.key").stat().st_mode) == 0o600
    printed = capsys.readouterr().out
    fingerprint = public_key_fingerprint(out / "hospitals/st-mary.pub")
    assert f"st-mary.pub: {fingerprint}" in printed and "stays on this site" in printed


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--san", "coordinator"], "--keys-only does not make"),
        (["--hospital", "st-mary"], "repeated: st-mary"),
    ],
)
def test_keys_only_refusals_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], expected: str
) -> None:
    argv = ["certs", "--out", str(tmp_path), "--keys-only", "--hospital", "st-mary", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err
    assert not (tmp_path / "hospitals").exists()


def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    assert main(["certs", "--out", str(tmp_path), "--keys-only", "--hospital", "a"]) == 0
    public = tmp_path / "hospitals" / "a.pub"
    blob = base64.b64decode(public.read_text().split()[1])
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert public_key_fingerprint(public) == expected
    if shutil.which("ssh-keygen"):
        listed = subprocess.run(["ssh-keygen", "-lf", str(public)], capture_output=True, text=True)
        assert expected in listed.stdout
    (tmp_path / "junk.pub").write_text("not a key\n")
    with pytest.raises(ProvisioningError, match="not an OpenSSH public key"):
        public_key_fingerprint(tmp_path / "junk.pub")


# ------------------------------------------------------------------ issue 17.3, 17.4, 17.8


@pytest.mark.parametrize(
    "host", ["bad host!", "https://coordinator.example.org", "", "300.1.2.3", "-a.example",
             "coordinator:9092", "[::1]", "a" * 64 + ".example", "fe80::1%eth0", "1.2.3"],
)  # fmt: skip
def test_san_must_be_a_dns_name_or_an_ip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    assert main(["certs", "--out", str(tmp_path / "pki"), f"--san={host}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--san" in err, err
    assert not (tmp_path / "pki").exists() or not any((tmp_path / "pki").iterdir())


def test_valid_sans_are_written(tmp_path: Path) -> None:
    sans = ["Coordinator.Example.org", "203.0.113.10", "2001:db8::10", "node-1.local."]
    argv = ["certs", "--out", str(tmp_path)]
    assert main([*argv, *(a for s in sans for a in ("--san", s))]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [
        "localhost",
        "coordinator.example.org",
        "node-1.local",
    ]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "::1",
        "203.0.113.10",
        "2001:db8::10",
    ]


def test_ca_and_server_certificate_without_hospitals(tmp_path: Path) -> None:
    """The recommended flow: the operator makes no hospital key at all."""
    assert main(["certs", "--out", str(tmp_path)]) == 0
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert files == ["ca.crt", "ca.key", "server.key", "server.pem"]


def test_keys_only_then_full_run_in_the_same_dir_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once the CA and server files were written before the hospital key was refused."""
    assert main(["certs", "--out", str(tmp_path), "--keys-only", "--hospital", "st-mary"]) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["certs", "--out", str(tmp_path), "--hospital", "st-mary"]) == 2
    err = capsys.readouterr().err
    assert "hospitals/st-mary.key, hospitals/st-mary.pub" in err and "nothing was written" in err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # no ca.crt, no server.pem, no staging folder left


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure half-way through the moves removes what was already moved into place."""
    real_link = os.link
    calls: list[str] = []

    def flaky(src: str, dst: str) -> None:
        calls.append(str(dst))
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", flaky)
    assert main(["certs", "--out", str(tmp_path), "--hospital", "a"]) == 2
    assert len(calls) == 3 and list(tmp_path.rglob("*.*")) == []


def test_ca_fingerprint_as_openssl_prints_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certs", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert main(["certs", "--fingerprint", str(tmp_path / "ca.crt")]) == 0
    line = capsys.readouterr().out.strip()
    der = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    digest = hashlib.sha256(der).hexdigest().upper()
    assert line == "sha256 Fingerprint=" + ":".join(digest[i : i + 2] for i in range(0, 64, 2))
    assert line in printed  # the provisioning run prints the same line
    openssl = shutil.which("openssl")
    if openssl:
        done = subprocess.run(
            [openssl, "x509", "-noout", "-fingerprint", "-sha256", "-in", str(tmp_path / "ca.crt")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert done.stdout.strip() == line
    assert main(["certs", "--fingerprint", str(tmp_path / "ca.key")]) == 2
    assert "is not a PEM certificate" in capsys.readouterr().err


def test_fingerprints_are_printed_verbatim(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rich turns ``:AB:`` into an emoji; a fingerprint read over the phone must stay as is."""
    fake = "sha256 Fingerprint=56:AB:0A:CD:CL:" + ":".join(["00"] * 27)
    monkeypatch.setattr(certs_command, "openssl_fingerprint", lambda _path: fake)
    assert main(["certs", "--out", str(tmp_path)]) == 0
    assert fake in capsys.readouterr().out
