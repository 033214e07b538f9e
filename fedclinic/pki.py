"""Provisioning for a federation: a consortium CA, the coordinator's TLS certificate, and
one node-authentication key pair per hospital.

Everything is generated in-process with ``cryptography`` (no ``openssl`` binary needed, the
same code on every platform). Formats are the ones Flower 1.39 loads:

- the SuperLink takes PEM files: ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem
  --ssl-keyfile server.key``; hospitals verify it with ``--root-certificates ca.crt``;
- ``flwr supernode register <hospital>.pub`` reads an **OpenSSH public key**
  (``load_ssh_public_key``) on a NIST curve; ``flower-supernode
  --auth-supernode-private-key <hospital>.key`` reads an **OpenSSH private key**
  (``load_ssh_private_key``; a PEM/PKCS#8 key is refused with "Unable to parse the private
  key file"). We use ECDSA P-384, the curve Flower's own examples use.

Private keys are created with mode 0600 from the first byte on (``os.open`` with the mode,
never a ``chmod`` afterwards, so there is no window in which another user can read them).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedclinic.errors import FedClinicError

DEFAULT_DNS_NAMES: tuple[str, ...] = ("localhost",)
DEFAULT_IP_ADDRESSES: tuple[str, ...] = ("127.0.0.1", "::1")
CURVE = ec.SECP384R1
PRIVATE_MODE = 0o600


class ProvisioningError(FedClinicError):
    """A file could not be written (it exists already, or a name or address is invalid)."""


@dataclass(frozen=True)
class HospitalKeys:
    """One hospital's node-authentication key pair (the private key stays at the hospital)."""

    name: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class Provisioned:
    """Paths of everything :func:`provision` wrote, for the runner and for the operator."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hospitals: dict[str, HospitalKeys] = field(default_factory=dict)


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data``; refuse to overwrite.

    ``O_EXCL`` makes an existing key an error rather than a silent replacement (a replaced
    hospital key would no longer match its registration at the coordinator).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except FileExistsError:
        raise ProvisioningError(f"'{path}' exists already; refusing to overwrite a key") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate or public key (world-readable is fine); refuse to overwrite."""
    try:
        with path.open("xb") as handle:
            handle.write(data)
    except FileExistsError:
        raise ProvisioningError(f"'{path}' exists already; refusing to overwrite it") from None


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    # Backdate a little: a freshly issued cert must verify on a machine whose clock lags.
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def _parse_ips(ip_addresses: Iterable[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    parsed = []
    for value in ip_addresses:
        try:
            parsed.append(ipaddress.ip_address(value))
        except ValueError:
            raise ProvisioningError(f"'{value}' is not an IP address") from None
    return parsed


def create_ca(
    directory: Path, common_name: str = "fedclinic consortium CA", days: int = 3650
) -> tuple[Path, Path]:
    """Write ``ca.crt`` and ``ca.key``: the root every hospital trusts for the coordinator."""
    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedclinic"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    not_before, not_after = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    write_private(key_path, _pem_private(key))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def create_server_certificate(
    ca_cert: Path,
    ca_key: Path,
    directory: Path,
    dns_names: Sequence[str] = DEFAULT_DNS_NAMES,
    ip_addresses: Sequence[str] = DEFAULT_IP_ADDRESSES,
    days: int = 825,
) -> tuple[Path, Path]:
    """Write ``server.pem`` and ``server.key`` for the SuperLink, signed by the CA.

    The SANs must list every name or address that hospitals, the ``flwr`` CLI and the
    SuperLink's own SuperExec dial; TLS hostname checks use the SANs only (not the CN).
    """
    if not dns_names and not ip_addresses:
        raise ProvisioningError("the server certificate needs at least one DNS name or IP SAN")
    ips = _parse_ips(ip_addresses)
    issuer_cert = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    issuer_key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    if not isinstance(issuer_key, ec.EllipticCurvePrivateKey):
        raise ProvisioningError(f"'{ca_key}' is not an EC private key")
    key = _new_key()
    common_name = dns_names[0] if dns_names else str(ips[0])
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ip) for ip in ips]
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedclinic"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, issuer_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA384())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    write_private(key_path, _pem_private(key))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def create_hospital_keys(directory: Path, name: str) -> HospitalKeys:
    """Write ``<name>.key`` (OpenSSH private, 0600) and ``<name>.pub`` (OpenSSH public).

    The coordinator registers the public key (``flwr supernode register``); only the
    hospital ever holds the private key, which signs its SuperNode's requests.
    """
    if not name or "/" in name or name.startswith("."):
        raise ProvisioningError(f"'{name}' is not a usable hospital name for a key file")
    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    write_private(private_path, private)
    write_public(public_path, public + f" {name}\n".encode())
    return HospitalKeys(name=name, private_key=private_path, public_key=public_path)


def check_hospital_names(hospitals: Iterable[str]) -> list[str]:
    """The names, if each is unique and usable as a key file name; else one error line."""
    names = list(hospitals)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ProvisioningError(f"hospital names must be unique; repeated: {', '.join(duplicates)}")
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise ProvisioningError(f"'{name}' is not a usable hospital name for a key file")
    return names


def provision(
    directory: Path,
    hospitals: Iterable[str],
    dns_names: Sequence[str] = DEFAULT_DNS_NAMES,
    ip_addresses: Sequence[str] = DEFAULT_IP_ADDRESSES,
) -> Provisioned:
    """Create CA, server certificate and hospital keys under one directory.

    Layout: ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` and
    ``hospitals/<name>.key|.pub``. Every input is checked before the first file is written,
    so a bad SAN or duplicate name leaves nothing half-provisioned.
    """
    names = check_hospital_names(hospitals)
    _parse_ips(ip_addresses)
    directory = directory.resolve()
    ca_cert, ca_key = create_ca(directory)
    server_cert, server_key = create_server_certificate(
        ca_cert, ca_key, directory, dns_names, ip_addresses
    )
    keys = {name: create_hospital_keys(directory / "hospitals", name) for name in names}
    return Provisioned(directory, ca_cert, ca_key, server_cert, server_key, keys)


def fingerprint(cert_path: Path | str) -> str:
    """SHA-256 of the certificate's DER encoding, as lowercase hex.

    The same value ``openssl x509 -fingerprint -sha256`` prints (without colons); the audit
    log records it so a run can be tied to the exact coordinator certificate.
    """
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def public_key_fingerprint(public_key: Path | str) -> str:
    """``SHA256:<base64>`` of an OpenSSH public key, as ``ssh-keygen -lf`` prints it.

    The hospital reads it to the coordinator operator over another channel (phone), and
    ``fedclinic register`` prints it: the key registered is the key the hospital made.
    """
    fields = Path(public_key).read_text(encoding="utf-8").split()
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (IndexError, ValueError):
        raise ProvisioningError(f"'{public_key}' is not an OpenSSH public key") from None
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"
