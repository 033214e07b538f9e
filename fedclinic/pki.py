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

All or nothing: every output path is checked before anything is generated, everything is
written into a staging folder beside the outputs, and each file is then linked into place
with ``os.link`` (atomic, never replaces a file); if one link fails, the ones already made
are removed again. A refused or failed run leaves the directory as it found it.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedclinic.errors import ConfigError

DEFAULT_DNS_NAMES: tuple[str, ...] = ("localhost",)
DEFAULT_IP_ADDRESSES: tuple[str, ...] = ("127.0.0.1", "::1")
CURVE = ec.SECP384R1
PRIVATE_MODE = 0o600


class ProvisioningError(ConfigError):
    """A file could not be written (it exists already, or a name or address is invalid):
    the operator's input, so the CLI exits 2 with nothing written."""


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


_HOSPITAL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # as the hospital config's 'hospital'
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def classify_san(host: str) -> tuple[str, str]:
    """``("ip", address)`` or ``("dns", name)`` for one ``--san``; anything else is refused.

    IP addresses: IPv4 or IPv6 as :mod:`ipaddress` reads them (no zone index, no brackets).
    DNS names: RFC 1123 host names (letters, digits, hyphens; labels of 1-63 characters,
    253 in all; not all-numeric, so ``300.1.2.3`` is neither a name nor an address).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if getattr(address, "scope_id", None):
            raise ProvisioningError(f"--san {host!r}: an IPv6 zone index cannot be certified")
        return "ip", str(address)
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if (
        not name
        or len(name) > 253
        or not all(_DNS_LABEL.match(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise ProvisioningError(
            f"--san {host!r} is neither a DNS name nor an IP address: expected e.g. "
            "coordinator.example.org, 203.0.113.10 or 2001:db8::10 (no scheme, port or path)"
        )
    return "dns", name.lower()


def split_sans(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Default loopback SANs plus ``hosts`` (checked), split into DNS names and IPs."""
    dns, ips = list(DEFAULT_DNS_NAMES), list(DEFAULT_IP_ADDRESSES)
    for host in hosts:
        kind, value = classify_san(host)
        target = ips if kind == "ip" else dns
        if value not in target:
            target.append(value)
    return dns, ips


def _ca(common_name: str, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed consortium CA: the root every hospital trusts for the coordinator."""
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
    return cert, key


def _server(
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The SuperLink's certificate, signed by the CA.

    The SANs must list every name or address that hospitals, the ``flwr`` CLI and the
    SuperLink's own SuperExec dial; TLS hostname checks use the SANs only (not the CN).
    """
    if not dns_names and not ip_addresses:
        raise ProvisioningError("the server certificate needs at least one DNS name or IP SAN")
    ips = _parse_ips(ip_addresses)
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
    return cert, key


def _hospital_key_pair(name: str) -> tuple[bytes, bytes]:
    """``<name>.key`` (OpenSSH private) and ``<name>.pub`` (OpenSSH public) contents.

    The coordinator registers the public key (``fedclinic register``); only the hospital
    ever holds the private key, which signs its SuperNode's requests.
    """
    key = _new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" {name}\n".encode()


#: ``{relative path: (content, private)}``: what one provisioning step writes
Files = Mapping[str, tuple[bytes, bool]]


def write_all(directory: Path, files: Files) -> None:
    """Write every file or none (see the module notes); refuses to replace any file."""
    directory = directory.resolve()
    existing = sorted(name for name in files if (directory / name).exists())
    if existing:
        raise ProvisioningError(
            f"'{directory}' already holds {', '.join(existing)}; refusing to overwrite "
            "(nothing was written): choose another --out or move those files away"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fedclinic-certs-", dir=directory))
    except OSError as err:
        raise ProvisioningError(f"cannot write to '{directory}': {err.strerror}") from None
    linked: list[Path] = []
    try:
        for name, (data, private) in files.items():
            staged = staging / name.replace("/", "__")
            (write_private if private else write_public)(staged, data)
        for name in files:
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(staging / name.replace("/", "__"), target)  # fails if it exists
            linked.append(target)
    except (OSError, ProvisioningError) as err:
        for target in linked:
            target.unlink(missing_ok=True)
        if isinstance(err, ProvisioningError):
            raise
        detail = (
            f"'{err.filename}' exists already"
            if isinstance(err, FileExistsError)
            else (err.strerror or str(err))
        )
        raise ProvisioningError(
            f"writing into '{directory}' failed ({detail}); nothing was left behind"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def create_hospital_keys(directory: Path, name: str) -> HospitalKeys:
    """Write one hospital's key pair, ``<name>.key`` (0600) and ``<name>.pub``."""
    return create_hospital_key_pairs(directory, [name])[name]


def create_hospital_key_pairs(directory: Path, names: Iterable[str]) -> dict[str, HospitalKeys]:
    """``fedclinic certs --keys-only``: each hospital's key pair, all or none."""
    checked = check_hospital_names(names)
    files: dict[str, tuple[bytes, bool]] = {}
    for name in checked:
        private, public = _hospital_key_pair(name)
        files[f"{name}.key"] = (private, True)
        files[f"{name}.pub"] = (public, False)
    write_all(directory, files)
    directory = directory.resolve()
    return {n: HospitalKeys(n, directory / f"{n}.key", directory / f"{n}.pub") for n in checked}


def check_hospital_names(hospitals: Iterable[str]) -> list[str]:
    """The names, if each is unique and usable as a key file name; else one error line."""
    names = list(hospitals)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ProvisioningError(f"hospital names must be unique; repeated: {', '.join(duplicates)}")
    for name in names:
        if not _HOSPITAL_NAME.match(name) or name.startswith("."):
            raise ProvisioningError(
                f"--hospital {name!r} is not a usable hospital name: expected 1-64 letters, "
                "digits, '_', '.' or '-', not starting with '.' (it names the key files)"
            )
    return names


def provision(
    directory: Path,
    hospitals: Iterable[str] = (),
    dns_names: Sequence[str] = DEFAULT_DNS_NAMES,
    ip_addresses: Sequence[str] = DEFAULT_IP_ADDRESSES,
) -> Provisioned:
    """Create CA, server certificate and (optionally) hospital keys under one directory.

    Layout: ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` and
    ``hospitals/<name>.key|.pub``. Every input and output path is checked before the first
    file is written, and the files appear all together or not at all (:func:`write_all`).
    Without hospitals it makes only the CA and the coordinator's certificate: the
    recommended flow, where each hospital makes its own key pair.
    """
    names = check_hospital_names(hospitals)
    for name in dns_names:
        if classify_san(name)[0] != "dns":
            raise ProvisioningError(f"'{name}' is an IP address, not a DNS name")
    _parse_ips(ip_addresses)
    directory = directory.resolve()
    ca_cert, ca_key = _ca("fedclinic consortium CA", 3650)
    server_cert, server_key = _server(ca_cert, ca_key, dns_names, ip_addresses, 825)
    files: dict[str, tuple[bytes, bool]] = {
        "ca.crt": (_pem(ca_cert), False),
        "ca.key": (_pem_private(ca_key), True),
        "server.pem": (_pem(server_cert), False),
        "server.key": (_pem_private(server_key), True),
    }
    for name in names:
        private, public = _hospital_key_pair(name)
        files[f"hospitals/{name}.key"] = (private, True)
        files[f"hospitals/{name}.pub"] = (public, False)
    write_all(directory, files)
    folder = directory / "hospitals"
    keys = {n: HospitalKeys(n, folder / f"{n}.key", folder / f"{n}.pub") for n in names}
    return Provisioned(
        directory,
        directory / "ca.crt",
        directory / "ca.key",
        directory / "server.pem",
        directory / "server.key",
        keys,
    )


def fingerprint(cert_path: Path | str) -> str:
    """SHA-256 of the certificate's DER encoding, as lowercase hex.

    The same value ``openssl x509 -fingerprint -sha256`` prints (without colons); the audit
    log records it so a run can be tied to the exact coordinator certificate.
    """
    path = Path(cert_path)
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as err:
        raise ProvisioningError(f"'{path}' cannot be read: {err.strerror}") from None
    except ValueError:
        raise ProvisioningError(f"'{path}' is not a PEM certificate") from None
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def openssl_fingerprint(cert_path: Path | str) -> str:
    """The line ``openssl x509 -noout -fingerprint -sha256 -in FILE`` prints (OpenSSL 3):
    ``sha256 Fingerprint=AB:CD:...``, for reading ``ca.crt``'s fingerprint over the phone."""
    digest = fingerprint(cert_path).upper()
    return "sha256 Fingerprint=" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


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
