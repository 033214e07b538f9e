"""Provisioning: the certificate chain a hospital verifies, and keys in the formats Flower loads."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedclinic.pki import (
    Provisioned,
    ProvisioningError,
    create_hospital_keys,
    fingerprint,
    provision,
    write_private,
)


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    return provision(tmp_path_factory.mktemp("pki"), ["hospital-a", "hospital-b"])


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_certificate_is_issued_by_the_ca(provisioned: Provisioned) -> None:
    ca, server = load_cert(provisioned.ca_cert), load_cert(provisioned.server_cert)
    server.verify_directly_issued_by(ca)  # raises when the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_server_certificate_has_the_loopback_sans(provisioned: Provisioned) -> None:
    sans = load_cert(provisioned.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert sans.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(sans.value.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }


def test_extra_sans(tmp_path: Path) -> None:
    done = provision(tmp_path, [], ["coordinator.example.org"], ["10.1.2.3"])
    sans = load_cert(done.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert sans.value.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert sans.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]


def handshake(provisioned: Provisioned, host: str) -> bytes:
    """What a hospital does: verify the server's chain and hostname with only the CA."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(provisioned.server_cert, provisioned.server_key)
    client_ctx = ssl.create_default_context(cafile=str(provisioned.ca_cert))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with (
                conn,
                contextlib.suppress(ssl.SSLError, OSError),
                server_ctx.wrap_socket(conn, server_side=True) as tls,
            ):
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                client_ctx.wrap_socket(raw, server_hostname=host) as tls,
            ):
                return tls.recv(2)
        finally:
            thread.join(5)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_tls_handshake_verifies_with_the_ca(provisioned: Provisioned, host: str) -> None:
    assert handshake(provisioned, host) == b"ok"


def test_hostname_outside_the_sans_is_refused(provisioned: Provisioned) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(provisioned, "coordinator.example.org")


def test_hospital_keys_are_ecdsa_p384_openssh(provisioned: Provisioned) -> None:
    keys = provisioned.hospitals["hospital-a"]
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)
    public = serialization.load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert private.curve.name == public.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert keys.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_flower_loads_the_hospital_keys(provisioned: Provisioned) -> None:
    """Through Flower 1.39's own loaders: ``flwr supernode register`` and the SuperNode."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    keys = provisioned.hospitals["hospital-b"]
    assert try_load_public_key(keys.public_key)
    args = argparse.Namespace(
        auth_supernode_private_key=str(keys.private_key), auth_supernode_public_key=None
    )
    loaded = _try_setup_client_authentication(args)
    assert loaded is not None
    _private, public = loaded
    assert (
        public.public_numbers()
        == serialization.load_ssh_public_key(keys.public_key.read_bytes()).public_numbers()
    )


def test_private_files_are_0600(provisioned: Provisioned) -> None:
    private_files = [provisioned.ca_key, provisioned.server_key] + [
        k.private_key for k in provisioned.hospitals.values()
    ]
    for path in private_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_private_files_are_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        keys = create_hospital_keys(tmp_path, "site")
    finally:
        os.umask(old)
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600


def test_keys_are_never_overwritten(tmp_path: Path) -> None:
    create_hospital_keys(tmp_path, "site")
    with pytest.raises(ProvisioningError, match=r"already holds site\.key, site\.pub"):
        create_hospital_keys(tmp_path, "site")
    with pytest.raises(ProvisioningError):
        write_private(tmp_path / "site.key", b"x")


def test_bad_inputs_leave_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(ProvisioningError, match="unique"):
        provision(tmp_path / "a", ["h", "h"])
    with pytest.raises(ProvisioningError, match="not an IP"):
        provision(tmp_path / "b", ["h"], ip_addresses=["not-an-ip"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_fingerprint_is_sha256_of_the_der(provisioned: Provisioned) -> None:
    der = load_cert(provisioned.server_cert).public_bytes(serialization.Encoding.DER)
    assert fingerprint(provisioned.server_cert) == hashlib.sha256(der).hexdigest()
    assert fingerprint(provisioned.ca_cert) != fingerprint(provisioned.server_cert)
