"""Throw-away TLS certificates for servers started here: a certificate authority made for one
run, and server certificates it signs for 127.0.0.1 and localhost. Made with ``cryptography``
into a directory of the run's own (never checked in), as PEM files any TLS stack reads.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Long enough for any test run or `orders dev` session; short enough to be worthless later.
VALIDITY = datetime.timedelta(days=2)
LOCAL_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class ServerCertificate:
    """The PEM files a TLS server needs, and the CA file its clients verify it with."""

    ca_file: Path
    certificate_file: Path  # the server's certificate, then the CA's: the chain it presents
    key_file: Path  # the server's private key, unencrypted PKCS#8, readable by its owner only

    @property
    def key_and_chain_file(self) -> Path:
        """Key and chain in one file (what Kafka's ``ssl.keystore.type=PEM`` reads)."""
        return self.key_file.with_name(self.key_file.stem + "-with-chain.pem")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "orders-service test run"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, content: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(content)


def _subject_alternative_names(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def server_certificate(
    directory: Path, name: str, *, hosts: tuple[str, ...] = LOCAL_HOSTS
) -> ServerCertificate:
    """A new CA and a certificate it signs for ``hosts``, written into ``directory`` as
    ``<name>-ca.pem``, ``<name>.pem``, ``<name>-key.pem`` and ``<name>-key-with-chain.pem``.
    The CA's own key is never written: nothing else can be signed with it."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + VALIDITY

    ca_key = _private_key()
    ca_name = _name(f"{name} CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = _private_key()
    server = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_subject_alternative_names(hosts), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    chain_pem = server.public_bytes(serialization.Encoding.PEM) + ca_pem
    files = ServerCertificate(
        ca_file=directory / f"{name}-ca.pem",
        certificate_file=directory / f"{name}.pem",
        key_file=directory / f"{name}-key.pem",
    )
    files.ca_file.write_bytes(ca_pem)
    files.certificate_file.write_bytes(chain_pem)
    _write_private(files.key_file, _pem_key(server_key))
    _write_private(files.key_and_chain_file, _pem_key(server_key) + chain_pem)
    return files
