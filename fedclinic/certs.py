"""``fedclinic certs``: provisioning, and what each written file is for.

- ``fedclinic certs --out DIR [--san HOST ...] [--hospital NAME ...]``: the consortium CA
  and the coordinator's certificate (the coordinator operator), plus key pairs for the
  listed hospitals (pilots and CI; in production each hospital makes its own);
- ``fedclinic certs --out DIR --keys-only --hospital NAME``: a hospital's key pair, at the
  hospital (the private key never travels);
- ``fedclinic certs --fingerprint ca.crt``: the certificate's fingerprint exactly as
  ``openssl x509 -noout -fingerprint -sha256`` prints it, to compare over the phone.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from fedclinic.errors import ConfigError
from fedclinic.pki import (
    create_hospital_key_pairs,
    fingerprint,
    openssl_fingerprint,
    provision,
    public_key_fingerprint,
    split_sans,
)

EXIT_OK = 0


def run_hospital_keys(args: argparse.Namespace) -> int:
    """``--keys-only``: a site makes its own key pair (no CA, no server certificate)."""
    if args.san:
        raise ConfigError(
            "--san names the coordinator certificate, which --keys-only does not make"
        )
    if not args.hospital:
        raise ConfigError("--keys-only needs --hospital NAME: the hospital whose key pair to make")
    made = create_hospital_key_pairs(args.out.resolve() / "hospitals", args.hospital)
    table = Table(title=f"hospital keys in {args.out.resolve() / 'hospitals'}")
    table.add_column("file")
    table.add_column("goes to")
    table.add_column("used as")
    for keys in made.values():
        table.add_row(
            keys.public_key.name,
            "the coordinator operator (any channel: it is public)",
            f"fedclinic register --key {keys.name}={keys.public_key.name}",
        )
        table.add_row(
            keys.private_key.name,
            "nowhere: it stays on this site (secret)",
            "fedclinic hospital --key",
        )
    console = Console(soft_wrap=True, emoji=False)  # a fingerprint's ":AB:" is no emoji
    console.print(table)
    for keys in made.values():  # read it to the operator on another channel; register prints it
        console.print(f"{keys.public_key.name}: {public_key_fingerprint(keys.public_key)}")
    return EXIT_OK


def run_certs(args: argparse.Namespace) -> int:
    """Write CA, server certificate and hospital keys; say what goes where."""
    if args.fingerprint is not None:
        print(openssl_fingerprint(args.fingerprint))
        return EXIT_OK
    if args.out is None:
        raise ConfigError("--out DIR is required (or --fingerprint FILE.crt)")
    if args.keys_only:
        return run_hospital_keys(args)
    dns, ips = split_sans(args.san)
    done = provision(args.out, args.hospital, dns, ips)
    table = Table(title=f"provisioned in {done.directory}")
    table.add_column("file")
    table.add_column("goes to")
    table.add_column("used as")
    table.add_row(
        done.ca_cert.name,
        "coordinator, every hospital, operators",
        "fedclinic hospital --ca; fedclinic register/submit --ca; the coordinator's "
        "--ssl-ca-certfile",
    )
    table.add_row(done.server_cert.name, "coordinator only", "the coordinator's --ssl-certfile")
    table.add_row(
        done.server_key.name, "coordinator only (secret)", "the coordinator's --ssl-keyfile"
    )
    table.add_row(
        done.ca_key.name, "nobody: keep offline (secret)", "only to issue a new server certificate"
    )
    for name, keys in done.hospitals.items():
        rel_pub = keys.public_key.relative_to(done.directory)
        rel_key = keys.private_key.relative_to(done.directory)
        register = f"fedclinic register --key {name}={rel_pub}"
        table.add_row(str(rel_pub), "coordinator operator", register)
        table.add_row(str(rel_key), f"{name} only (secret)", "fedclinic hospital --key")
    console = Console(soft_wrap=True, emoji=False)  # a fingerprint's ":AB:" is no emoji
    console.print(table)
    console.print(f"server certificate SANs: {', '.join(dns + ips)}")
    console.print(f"CA fingerprint (read it to each hospital): {openssl_fingerprint(done.ca_cert)}")
    console.print(f"server SHA-256 fingerprint: {fingerprint(done.server_cert)}")
    return EXIT_OK
