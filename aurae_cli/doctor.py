"""`aurae-py doctor`: check everything between this client and a serving auraed.

The checks run in the order a connection needs them (config, certificate
files, the certificates themselves, the socket, an mTLS call, health), each
printed as it completes with what was found and, on failure, how to fix it.
A check whose basis failed is reported as skipped rather than failing again
with a vaguer message. The exit status is 0 only when nothing failed;
certificates that expire within 30 days warn without failing.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import socket as sockets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

import click

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

    from aurae_sdk.config import ClientConfig, Target

T = TypeVar("T")

EXPIRY_WARNING = dt.timedelta(days=30)
CALL_TIMEOUT = 5.0

Outcome = Literal["ok", "warn", "fail", "skip"]
MARKS = {"ok": "✓", "warn": "!", "fail": "✗", "skip": "-"}


@dataclass(frozen=True)
class Finding:
    outcome: Outcome
    what: str
    fix: str = ""


@dataclass(frozen=True)
class Credentials:
    ca: x509.Certificate
    client: x509.Certificate
    key: PrivateKeyTypes


@dataclass(frozen=True)
class ConfigLocation:
    """The --config value and where click took it from."""

    path: str | None
    origin: Literal["option", "environment", "default"]


class Doctor:
    """Runs the checks in order and hands each finding to `report` as it is made."""

    def __init__(
        self, location: ConfigLocation, socket: str | None, report: Callable[[Finding], None]
    ) -> None:
        self._location = location
        self._socket = socket
        self._report = report
        self.failed = False
        self.warned = False
        # What the local checks found wrong with the client certificate, to
        # explain a refusal by the daemon.
        self._client_certificate_problems: list[str] = []

    def _add(self, outcome: Outcome, what: str, fix: str = "") -> None:
        self.failed = self.failed or outcome == "fail"
        self.warned = self.warned or outcome == "warn"
        self._report(Finding(outcome, what, fix))

    def run(self) -> None:
        path = self._find_config()
        config = self._load_config(path) if path else None
        credentials = self._load_credentials(config) if config else None
        if config is None or credentials is None:
            self._add(
                "skip",
                "certificates, socket and daemon: not checked without a "
                "readable config and certificates",
            )
            return
        self._check_chain(credentials, config)
        self._check_validity("CA certificate (ca_crt)", credentials.ca, is_ca=True)
        self._check_validity("client certificate (client_crt)", credentials.client, is_ca=False)
        self._check_key_pair(credentials, config)
        if not self._check_socket(config):
            self._add("skip", "mTLS Discover and health: not checked without a reachable socket")
            return
        if self._check_discover(config, credentials):
            self._check_health(config)
        else:
            self._add("skip", "health: not checked without a working mTLS connection")

    # -- config ---------------------------------------------------------------

    def _find_config(self) -> str | None:
        from aurae_sdk.config import CONFIG_ENV, SEARCH_PATHS

        location = self._location
        if location.path is not None:
            origin = "given with --config" if location.origin == "option" else f"from ${CONFIG_ENV}"
            path = os.path.expanduser(location.path)
            if os.path.exists(path):
                self._add("ok", f"config {path} ({origin})")
                return path
            fix = (
                "pass the path of an existing config"
                if location.origin == "option"
                else f"point ${CONFIG_ENV} at an existing config, or unset it to use "
                f"{', '.join(SEARCH_PATHS)}"
            )
            self._add("fail", f"config {path} ({origin}) does not exist", fix)
            return None
        tried = [os.path.expanduser(candidate) for candidate in SEARCH_PATHS]
        for candidate in tried:
            if os.path.exists(candidate):
                self._add(
                    "ok", f"config {candidate} (the first of {', '.join(SEARCH_PATHS)} that exists)"
                )
                return candidate
        self._add(
            "fail",
            f"no client config: ${CONFIG_ENV} is not set and none of {', '.join(tried)} exists",
            f"create one with `aurae-py pki init DIR --socket SOCKET`, then "
            f"`export {CONFIG_ENV}=DIR/config` (or pass --config PATH)",
        )
        return None

    def _load_config(self, path: str) -> ClientConfig | None:
        from aurae_sdk.config import ConfigError, load_config

        try:
            config = load_config(path, socket=self._socket)
        except ConfigError as error:
            self._add(
                "fail",
                f"config does not load: {error}",
                f"edit {path}: it needs [auth] ca_crt, client_crt, client_key and "
                "[system] socket, all strings",
            )
            return None
        socket_origin = "--socket" if self._socket else "[system] socket"
        self._add("ok", f"config loads: daemon at {config.target.display} ({socket_origin})")
        return config

    # -- certificates -----------------------------------------------------------

    def _load_credentials(self, config: ClientConfig) -> Credentials | None:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        ca = self._load_pem("ca_crt", config.ca_crt, config, x509.load_pem_x509_certificate)
        client = self._load_pem(
            "client_crt", config.client_crt, config, x509.load_pem_x509_certificate
        )
        key = self._load_pem(
            "client_key",
            config.client_key,
            config,
            lambda data: load_pem_private_key(data, password=None),
        )
        if ca is None or client is None or key is None:
            return None
        return Credentials(ca, client, key)

    def _load_pem(
        self, key: str, path: str, config: ClientConfig, parse: Callable[[bytes], T]
    ) -> T | None:
        kind = "private key" if key == "client_key" else "certificate"
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as error:
            fix = (
                f"run as a user that may read {path}"
                if error.errno == errno.EACCES
                else f"set [auth] {key} in {config.source} to the {kind}'s path"
            )
            self._add("fail", f"{key} {path}: cannot read: {error.strerror}", fix)
            return None
        try:
            parsed = parse(data)
        except (ValueError, TypeError):
            self._add(
                "fail",
                f"{key} {path} is not a PEM {kind}",
                f"set [auth] {key} in {config.source} to a PEM {kind}",
            )
            return None
        self._add("ok", f"{key} {path}: {_describe_pem(parsed)}")
        return parsed

    def _check_chain(self, credentials: Credentials, config: ClientConfig) -> None:
        from cryptography.exceptions import InvalidSignature

        ca, client = credentials.ca, credentials.client
        try:
            client.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            if client.issuer == ca.subject:
                detail = (
                    f"its issuer is named {ca.subject.rfc4514_string()} like the CA, "
                    "but a different CA of that name signed it"
                )
            else:
                detail = (
                    f"its issuer is {client.issuer.rfc4514_string()}, the CA is "
                    f"{ca.subject.rfc4514_string()}"
                )
            self._client_certificate_problems.append("it is not signed by the CA in ca_crt")
            self._add(
                "fail",
                f"client certificate is not signed by the CA in ca_crt: {detail}",
                f"issue a client certificate from this CA (`aurae-py pki issue "
                f"{os.path.dirname(config.ca_crt)} NAME`), or set ca_crt to the CA "
                "that signed it",
            )
            return
        self._add("ok", f"client certificate is signed by the CA ({ca.subject.rfc4514_string()})")

    def _check_validity(self, label: str, certificate: x509.Certificate, *, is_ca: bool) -> None:
        now = dt.datetime.now(dt.UTC)
        start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        renew = (
            "make a new PKI (`aurae-py pki init DIR`) and restart auraed with it"
            if is_ca
            else "issue a new one: `aurae-py pki issue PKI_DIR NAME --force`"
        )
        if now < start:
            self._add(
                "fail",
                f"{label} is not valid before {start:%Y-%m-%d %H:%M} UTC",
                "check this machine's clock, or " + renew,
            )
            if not is_ca:
                self._client_certificate_problems.append("it is not valid yet")
        elif now >= end:
            self._add("fail", f"{label} expired on {end:%Y-%m-%d %H:%M} UTC", renew)
            if not is_ca:
                self._client_certificate_problems.append("it has expired")
        elif end - now < EXPIRY_WARNING:
            self._add(
                "warn", f"{label} expires on {end:%Y-%m-%d} UTC, in {(end - now).days} days", renew
            )
        else:
            self._add("ok", f"{label} valid until {end:%Y-%m-%d} ({(end - now).days} days left)")

    def _check_key_pair(self, credentials: Credentials, config: ClientConfig) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        def spki(public_key: object) -> bytes:
            return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
                Encoding.DER, PublicFormat.SubjectPublicKeyInfo
            )

        if spki(credentials.key.public_key()) != spki(credentials.client.public_key()):
            self._add(
                "fail",
                "client_key is not the private key of client_crt",
                f"set [auth] client_key in {config.source} to the key issued with "
                f"{config.client_crt}",
            )
            return
        self._add("ok", "client_key matches client_crt")

    # -- the daemon -------------------------------------------------------------

    def _check_socket(self, config: ClientConfig) -> bool:
        target = config.target
        start_daemon = (
            f"start auraed there (auraed --socket {target.display} ...), or set "
            f"[system] socket in {config.source} to where it listens"
        )
        if target.kind == "unix":
            path = target.display
            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:
                self._add(
                    "fail",
                    f"socket {path} does not exist: auraed is not running there",
                    start_daemon,
                )
                return False
            except OSError as error:
                self._add("fail", f"socket {path}: {error.strerror}", start_daemon)
                return False
            if not stat.S_ISSOCK(mode):
                self._add(
                    "fail",
                    f"{path} exists but is not a socket",
                    f"set [system] socket in {config.source} to auraed's socket",
                )
                return False
        try:
            with _connect(target, timeout=CALL_TIMEOUT):
                pass
        except OSError as error:
            if error.errno == errno.ECONNREFUSED:
                what = f"nothing accepts connections on {target.display}" + (
                    " (the socket file of a daemon that is gone)" if target.kind == "unix" else ""
                )
                self._add("fail", what, start_daemon)
            elif error.errno == errno.EACCES:
                self._add(
                    "fail",
                    f"permission denied connecting to {target.display}",
                    "run as root or as auraed's user: its socket is private (mode 0600)",
                )
            else:
                self._add(
                    "fail",
                    f"cannot connect to {target.display}: {error.strerror or error}",
                    start_daemon,
                )
            return False
        self._add("ok", f"{target.display} accepts connections")
        return True

    def _check_discover(self, config: ClientConfig, credentials: Credentials) -> bool:
        from aurae_sdk.client import Client
        from aurae_sdk.errors import AuraeError, Unavailable
        from aurae_sdk.rpc import NO_RETRY

        try:
            with Client(config, timeout=CALL_TIMEOUT, retry=NO_RETRY) as client:
                found = client.discovery.discover()
        except Unavailable as error:
            self._report_unavailable(error, config, credentials)
            return False
        except AuraeError as error:
            self._add(
                "fail",
                f"mTLS Discover failed: {error}",
                "see the daemon's log for why it refused the call",
            )
            return False
        if not found.healthy:
            self._add(
                "fail",
                f"auraed {found.version} answers but is not healthy",
                "it is starting or shutting down; see its log",
            )
            return False
        self._add("ok", f"mTLS Discover: auraed {found.version}, healthy")
        return True

    def _report_unavailable(
        self, error: Exception, config: ClientConfig, credentials: Credentials
    ) -> None:
        """Say why an mTLS call failed: the server's CA, our certificate, or the network."""
        if "refused" in str(error).lower():
            self._add(
                "fail",
                f"mTLS Discover: connection refused by {config.target.display}",
                "start auraed, or check [system] socket",
            )
            return
        verdict = _handshake_verdict(config, credentials)
        if isinstance(verdict, ServerNotTrusted):
            self._add(
                "fail",
                f"TLS handshake failed: auraed's certificate (issuer {verdict.issuer}) is not "
                f"signed by the CA in ca_crt ({credentials.ca.subject.rfc4514_string()}): the "
                "daemon uses a different CA",
                f"set [auth] ca_crt in {config.source} to the CA auraed was started with "
                "(its --ca-crt)",
            )
        elif isinstance(verdict, ClientRefused):
            why = (
                " and ".join(self._client_certificate_problems)
                or "it does not trust the CA that signed it"
            )
            self._add(
                "fail",
                f"TLS handshake failed: auraed {verdict.how} after seeing the client "
                f"certificate: {why}",
                "issue a new client certificate from auraed's CA (`aurae-py pki issue PKI_DIR "
                "NAME` on the daemon's PKI) and point client_crt and client_key at it",
            )
        else:
            self._add(
                "fail",
                f"mTLS Discover failed: {error}",
                "fix the problems above first; else see the daemon's log",
            )

    def _check_health(self, config: ClientConfig) -> None:
        from aurae_sdk.client import Client
        from aurae_sdk.errors import AuraeError, NotFound
        from aurae_sdk.generated.services import SERVICES

        services = ["", *(name for *_, name in SERVICES.values() if not name.startswith("grpc."))]
        with Client(config, timeout=CALL_TIMEOUT) as client:
            for service in services:
                label = service or "the server"
                try:
                    status = client.health.check(service=service)
                except NotFound:
                    self._add(
                        "fail",
                        f"health of {label}: auraed does not serve it",
                        "client and daemon differ in version; compare "
                        "`aurae-py discovery discover` with `aurae-py --version`",
                    )
                    continue
                except AuraeError as error:
                    self._add("fail", f"health of {label}: {error}", "see the daemon's log")
                    continue
                name = type(status).ServingStatus.Name(status.status)
                if name == "SERVING":
                    self._add("ok", f"health of {label}: SERVING")
                else:
                    self._add(
                        "fail",
                        f"health of {label}: {name}",
                        "the daemon is starting or shutting down; see its log",
                    )


def _connect(target: Target, timeout: float) -> sockets.socket:
    if target.kind == "unix":
        connection = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        connection.settimeout(timeout)
        try:
            connection.connect(target.display)
        except OSError:
            connection.close()
            raise
        return connection
    host, _, port = target.display.rpartition(":")
    return sockets.create_connection((host.strip("[]").split("%")[0], int(port)), timeout=timeout)


@dataclass(frozen=True)
class ServerNotTrusted:
    """The daemon's certificate is not signed by our CA."""

    issuer: str


@dataclass(frozen=True)
class ClientRefused:
    """The daemon ended the connection on seeing our certificate."""

    how: str


def _handshake_verdict(
    config: ClientConfig, credentials: Credentials
) -> ServerNotTrusted | ClientRefused | None:
    """Do the TLS handshake by hand to find whose certificate is refused.

    grpc reports any failed handshake as UNAVAILABLE with a message that does
    not say which side refused; here the daemon's certificate is checked
    against our CA, and the daemon's reaction to ours is watched. None when
    the handshake cannot be made at all or succeeds.
    """
    import ssl

    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    from aurae_sdk.config import TLS_SERVER_NAME

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Verification is done below, so that a mismatch can be described.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        context.load_cert_chain(config.client_crt, config.client_key)
    except (ssl.SSLError, OSError):
        return None  # our own key and certificate are unusable; reported already
    try:
        with (
            _connect(config.target, timeout=CALL_TIMEOUT) as connection,
            context.wrap_socket(connection, server_hostname=TLS_SERVER_NAME) as tls,
        ):
            server = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
            try:
                server.verify_directly_issued_by(credentials.ca)
            except (ValueError, TypeError, InvalidSignature):
                return ServerNotTrusted(server.issuer.rfc4514_string())
            # With TLS 1.3 the daemon judges our certificate after the client
            # considers the handshake done: acceptance shows as its first
            # HTTP/2 bytes, refusal as an alert or a closed connection.
            if tls.recv(1):
                return None
            return ClientRefused("closed the connection")
    except ssl.SSLError as error:
        return ClientRefused(f"ended the handshake ({error.reason or error})")
    except OSError:
        return None


def _describe_pem(parsed: object) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(parsed, x509.Certificate):
        return f"certificate for {parsed.subject.rfc4514_string()}"
    if isinstance(parsed, ec.EllipticCurvePrivateKey):
        return f"EC {parsed.curve.name} private key"
    if isinstance(parsed, rsa.RSAPrivateKey):
        return f"RSA {parsed.key_size}-bit private key"
    return f"{type(parsed).__name__}"


def print_finding(finding: Finding) -> None:
    click.echo(f"{MARKS[finding.outcome]} {finding.what}")
    if finding.fix:
        click.echo(f"  fix: {finding.fix}")


@click.command("doctor")
@click.pass_context
def doctor_command(ctx: click.Context) -> None:
    """Check the config, certificates and daemon, and say what to fix.

    In order: the client config (which file, and how it was found) and its
    values; that ca_crt, client_crt and client_key are readable PEM; that the
    CA signed the client certificate; both certificates' validity dates; that
    the key belongs to the certificate; the socket; a real mTLS Discover call;
    and the health of the server and each service. Exits 0 only if all pass.

    \b
    Examples:
      aurae-py doctor
      aurae-py --context edge-1 doctor
      aurae-py --config ./pki/config doctor
    """
    # grpc's core logs failed handshakes to stderr itself; the findings say it better.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    root = ctx.find_root()
    source = root.get_parameter_source("config")
    origin: Literal["option", "environment", "default"] = (
        "option"
        if source == click.core.ParameterSource.COMMANDLINE
        else "environment"
        if source == click.core.ParameterSource.ENVIRONMENT
        else "default"
    )
    session = root.obj
    doctor = Doctor(ConfigLocation(session.config, origin), session.socket, print_finding)
    doctor.run()
    if doctor.failed:
        click.echo("Some checks failed; fix the first ✗ above first.")
        ctx.exit(1)
    click.echo("All checks passed, with warnings." if doctor.warned else "All checks passed.")
