"""The throw-away certificates for servers started here: a client that trusts only their CA
completes a TLS handshake with them for 127.0.0.1 and localhost, and for no other name or CA.
The handshake runs in memory (no socket): Python's own TLS stack on both sides."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest

from service.infra.embedded.certificates import ServerCertificate, server_certificate


def _handshake(server: ServerCertificate, ca_file: Path, host: str) -> None:
    """A full TLS handshake between a server with ``server``'s files and a client that trusts
    ``ca_file`` and verifies ``host``; raises what the client's verification raises."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(server.certificate_file, server.key_file)
    client_context = ssl.create_default_context(cafile=str(ca_file))
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_side = server_context.wrap_bio(to_server, to_client, server_side=True)
    client_side = client_context.wrap_bio(to_client, to_server, server_hostname=host)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client_side), ("server", server_side)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        if all(done.values()):
            return
    raise AssertionError("the handshake never finished")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_client_trusting_the_ca_accepts_the_server_for_each_local_name(
    tmp_path: Path, host: str
) -> None:
    files = server_certificate(tmp_path, "broker")

    _handshake(files, files.ca_file, host)


def test_a_client_refuses_the_server_for_another_host_name(tmp_path: Path) -> None:
    files = server_certificate(tmp_path, "broker")

    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _handshake(files, files.ca_file, "kafka.example")


def test_a_client_trusting_another_run_s_ca_refuses_the_server(tmp_path: Path) -> None:
    files = server_certificate(tmp_path / "one", "broker")
    stranger = server_certificate(tmp_path / "two", "broker")

    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _handshake(files, stranger.ca_file, "127.0.0.1")


def test_private_keys_are_readable_by_their_owner_only_and_the_ca_key_is_never_written(
    tmp_path: Path,
) -> None:
    files = server_certificate(tmp_path, "broker")

    for key in (files.key_file, files.key_and_chain_file):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    keys = [p.name for p in tmp_path.iterdir() if "PRIVATE KEY" in p.read_text()]
    assert sorted(keys) == sorted([files.key_file.name, files.key_and_chain_file.name])
    assert files.key_and_chain_file.read_text().count("BEGIN CERTIFICATE") == 2
