"""Provisioning at a hospital: ``fedclinic certs --keys-only`` makes the site's key pair and
nothing else (no CA), and the public key's fingerprint is the one ``ssh-keygen -l`` prints,
so hospital and operator can compare it over another channel."""

from __future__ import annotations

import base64
import hashlib
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

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
