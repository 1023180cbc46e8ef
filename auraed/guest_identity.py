"""Server identities the host daemon mints for its guests.

A guest's auraed must present a certificate the host's clients already trust, so it is signed by
the host's CA; it names the guest by a SPIFFE ID of its own, `spiffe://<trust domain>/vm/<id>`,
and carries the server name every Aurae client verifies. The host's own server key never leaves
the host: each guest gets a fresh key that lives in the VM's runtime directory (shared read-only
into the guest) and is removed with the VM.

The daemon signs with the CA key given by --ca-key; without it, VMs cannot start. (Minting for
every side will live in aurae_sdk.wire.pki; this module is the daemon's one entry point to it.)
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "server.unsafe.aurae.io"
DEFAULT_TRUST_DOMAIN = "unsafe.aurae.io"
VALIDITY = dt.timedelta(days=30)
CLOCK_SKEW_ALLOWANCE = dt.timedelta(minutes=5)


class IdentityError(Exception):
    """The CA material cannot sign guest identities; the message says why."""


@dataclass(frozen=True)
class GuestIdentity:
    spiffe_id: str
    certificate_pem: bytes
    private_key_pem: bytes


def guest_spiffe_id(vm_id: str, host_certificate_pem: bytes) -> str:
    """`<host's SPIFFE ID>/vm/<id>` when the host's certificate has one, else under the trust
    domain Aurae's development PKI uses."""
    try:
        host = x509.load_pem_x509_certificate(host_certificate_pem)
        uris = host.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier)
    except (ValueError, x509.ExtensionNotFound):
        uris = []
    base = next((u.rstrip("/") for u in uris if u.startswith("spiffe://")),
                f"spiffe://{DEFAULT_TRUST_DOMAIN}")
    return f"{base}/vm/{vm_id}"


def mint_guest_identity(vm_id: str, ca_certificate_pem: bytes, ca_key_pem: bytes,
                        host_certificate_pem: bytes) -> GuestIdentity:
    ca, ca_key = _load_ca(ca_certificate_pem, ca_key_pem)
    spiffe_id = guest_spiffe_id(vm_id, host_certificate_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    try:
        authority = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value)
    except x509.ExtensionNotFound:
        authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
        .not_valid_after(min(now + VALIDITY, ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(SERVER_NAME), x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(authority, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return GuestIdentity(
        spiffe_id,
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
    )


def mint_client_identity(ca_certificate_pem: bytes, ca_key_pem: bytes,
                         host_certificate_pem: bytes) -> tuple[bytes, bytes]:
    """(certificate, key) PEM of the host daemon's own client identity towards its guests
    (`<host>/vm-supervisor`), held in memory only: it checks a guest's health at boot."""
    ca, ca_key = _load_ca(ca_certificate_pem, ca_key_pem)
    spiffe_id = guest_spiffe_id("", host_certificate_pem).removesuffix("/vm/") + "/vm-supervisor"
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = "vm-supervisor.unsafe.aurae.io"
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
        .not_valid_after(min(now + VALIDITY, ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(name), x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return (certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _load_ca(certificate_pem: bytes,
             key_pem: bytes) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    try:
        ca = x509.load_pem_x509_certificate(certificate_pem)
        ca_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as error:
        raise IdentityError(f"cannot load the CA certificate or key: {error}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise IdentityError("the CA key is neither ECDSA nor RSA")
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if ca_key.public_key().public_bytes(der, spki) != ca.public_key().public_bytes(der, spki):
        raise IdentityError("--ca-key is not the private key of --ca-crt")
    return ca, ca_key
