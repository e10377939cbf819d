"""DICOM over TLS (PS3.15 B.1): the listener requires TLS and, with a CA, client certificates."""

from __future__ import annotations

import datetime as dt
import select
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom import dcmread
from pynetdicom import AE

from integrations.dicom.listener import Listener

CORPUS = Path(__file__).resolve().parents[2] / "data" / "dicom"


def _cert(tmp: Path, name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
          ca: bool = False) -> tuple[Path, Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[0].subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                                     x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    cp, kp = tmp / f"{name}.crt", tmp / f"{name}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cp, kp, cert, key


def _store(port: int, ctx: ssl.SSLContext | None) -> int | None:
    ds = dcmread(CORPUS / "ct" / "pydicom_CT_small.dcm")
    ae = AE(ae_title="TLSPACS")
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="TAQRIR", tls_args=(ctx, "localhost") if ctx else None)
    if not assoc.is_established:
        return None
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status) if status else None


def test_tls_with_client_certificates(start_listener: Callable[..., Listener], tmp_path: Path) -> None:
    ca_crt, _ca_key, ca_cert, ca_priv = _cert(tmp_path, "ca", ca=True)
    srv_crt, srv_key, _, _ = _cert(tmp_path, "server", issuer=(ca_cert, ca_priv))
    cli_crt, cli_key, _, _ = _cert(tmp_path, "client", issuer=(ca_cert, ca_priv))
    listener = start_listener(tls_cert=srv_crt, tls_key=srv_key, tls_ca=ca_crt, network_timeout=3, acse_timeout=3)
    port = listener.port  # type: ignore[attr-defined]

    good = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_crt))
    good.load_cert_chain(str(cli_crt), str(cli_key))
    silent = socket.create_connection(("127.0.0.1", port))  # connects, never says hello
    t0 = time.monotonic()
    assert _store(port, good) == 0x0000
    assert time.monotonic() - t0 < 2.5, "a silent peer held up the TLS handshake of others"
    silent.close()

    no_client_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_crt))
    assert _store(port, no_client_cert) is None
    assert _store(port, None) is None  # plain TCP to a TLS port
    assert _store(port, good) == 0x0000  # and it still serves


def test_a_handshake_trickled_a_byte_at_a_time_is_cut_at_acse_timeout(start_listener: Callable[..., Listener],
                                                                       tmp_path: Path) -> None:
    """The whole TLS handshake gets ``acse_timeout``, not each receive of it: a peer sending its
    ClientHello a byte every 0.2 s would otherwise hold its connection (a thread, a slot of
    ``max_associations``) for a minute, and twenty such peers would refuse every PACS. (A review
    suspected this; CPython's ``do_handshake`` already treats the socket's timeout as a deadline
    for the handshake. This pins it.)"""
    srv_crt, srv_key, _, _ = _cert(tmp_path, "server")
    listener = start_listener(tls_cert=srv_crt, tls_key=srv_key, acse_timeout=1)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(srv_crt))
    outgoing = ssl.MemoryBIO()
    hello_maker = client.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
    try:
        hello_maker.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert len(hello) > 100  # a real ClientHello: trickled whole, it would take 20 s and more
    sock = socket.create_connection(("127.0.0.1", listener.port))  # type: ignore[attr-defined]
    started = time.monotonic()
    try:
        for byte in hello:
            if select.select([sock], [], [], 0.2)[0]:  # the listener closed it (nothing else is sent)
                break
            sock.sendall(bytes([byte]))
            assert time.monotonic() - started < 4, "the trickled handshake is still open after 4 s"
    except OSError:  # reset by the listener
        pass
    assert 0.8 < time.monotonic() - started < 4
    sock.close()
    srv = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(srv_crt))
    assert _store(listener.port, srv) == 0x0000  # type: ignore[attr-defined]
