"""Client configuration: where it is found, how it is merged, and every socket form, connected for real."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from socket import if_nametoindex
from typing import Self

import grpc
import pytest

from aurae_cli import pki
from aurae_sdk.config import (
    TLS_SERVER_NAME,
    ClientConfig,
    ConfigError,
    Target,
    channel_credentials,
    channel_options,
    load_config,
    parse_target,
)

SYSTEM_CONFIGS = ("/etc/aurae/config", "/var/lib/aurae/config")


def write_config(path: Path, *, socket: str = "/run/aurae.sock", auth: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if auth is None:
        auth = 'ca_crt = "/pki/ca.crt"\nclient_crt = "/pki/c.crt"\nclient_key = "/pki/c.key"\n'
    path.write_text(f'[auth]\n{auth}\n[system]\nsocket = "{socket}"\n')
    return path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HOME, and no $AURAE_CONFIG."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("AURAE_CONFIG", raising=False)
    return home


# --- finding the file ---------------------------------------------------------------------------


def test_home_config_is_found(home: Path) -> None:
    path = write_config(home / ".aurae" / "config")

    config = load_config()

    assert config == ClientConfig(
        ca_crt="/pki/ca.crt",
        client_crt="/pki/c.crt",
        client_key="/pki/c.key",
        socket="/run/aurae.sock",
        source=str(path),
    )


def test_aurae_config_wins_over_home(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(home / ".aurae" / "config", socket="/home.sock")
    chosen = write_config(tmp_path / "elsewhere" / "config", socket="/env.sock")
    monkeypatch.setenv("AURAE_CONFIG", str(chosen))

    assert load_config().socket == "/env.sock"


def test_path_argument_wins_over_aurae_config(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AURAE_CONFIG", str(write_config(tmp_path / "env", socket="/env.sock")))

    assert load_config(write_config(tmp_path / "arg", socket="/arg.sock")).socket == "/arg.sock"


def test_tilde_is_expanded_everywhere(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(
        home / "cfg",
        socket="~/aurae.sock",
        auth='ca_crt = "~/pki/ca.crt"\nclient_crt = "~/pki/c.crt"\nclient_key = "~/pki/c.key"\n',
    )

    from_path = load_config("~/cfg", client_key="~/other.key")
    monkeypatch.setenv("AURAE_CONFIG", "~/cfg")
    from_env = load_config()

    assert from_path.source == from_env.source == str(home / "cfg")
    assert from_path.ca_crt == str(home / "pki" / "ca.crt")
    assert from_path.client_key == str(home / "other.key")
    # The socket is kept as written; parsing it expands the ~.
    assert from_path.socket == "~/aurae.sock"
    assert from_path.target.grpc_target == f"unix:{home}/aurae.sock"


def test_relative_certificate_paths_are_relative_to_the_file(home: Path) -> None:
    auth = 'ca_crt = "ca.crt"\nclient_crt = "sub/c.crt"\nclient_key = "../c.key"\n'
    path = write_config(home / "pki" / "config", auth=auth)

    config = load_config(path)

    assert config.ca_crt == str(home / "pki" / "ca.crt")
    assert config.client_crt == str(home / "pki" / "sub" / "c.crt")
    assert config.client_key == str(home / "pki" / ".." / "c.key")


def test_missing_everywhere_lists_what_was_tried(home: Path) -> None:
    if any(os.path.exists(path) for path in SYSTEM_CONFIGS):
        pytest.skip("this machine has a system-wide Aurae config")

    with pytest.raises(ConfigError) as error:
        load_config()

    message = str(error.value)
    assert f"{home}/.aurae/config" in message
    assert "/etc/aurae/config" in message and "/var/lib/aurae/config" in message
    assert "AURAE_CONFIG" in message and "pki init" in message


def test_aurae_config_naming_a_missing_file_does_not_fall_back(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(home / ".aurae" / "config")
    monkeypatch.setenv("AURAE_CONFIG", str(tmp_path / "nope"))

    with pytest.raises(ConfigError, match=r"nope \(from \$AURAE_CONFIG\) does not exist"):
        load_config()


def test_missing_path_argument(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"config file {tmp_path}/nope does not exist"):
        load_config(tmp_path / "nope")


# --- merging ------------------------------------------------------------------------------------


def test_explicit_arguments_override_the_file(home: Path) -> None:
    write_config(home / ".aurae" / "config")

    config = load_config(socket="10.0.0.1:8080", client_crt="/mine.crt")

    assert (config.socket, config.client_crt, config.client_key) == (
        "10.0.0.1:8080",
        "/mine.crt",
        "/pki/c.key",
    )


def test_all_arguments_need_no_file(home: Path) -> None:
    config = load_config(socket="/s", ca_crt="/ca", client_crt="/c", client_key="/k")

    assert config.source == "arguments"


def test_arguments_fill_keys_the_file_lacks(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config", auth='ca_crt = "/ca"\nclient_crt = "/c"\n')

    with pytest.raises(ConfigError, match=f"{tmp_path}/config: missing client_key in \\[auth\\]"):
        load_config(path)
    assert load_config(path, client_key="/k").client_key == "/k"


# --- bad files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[auth]\nca_crt = "/ca"\nclient_crt = \n', r"not valid TOML: .*line 3"),
        (
            '[auth]\nca_crt = 1\nclient_crt = "/c"\nclient_key = "/k"\n',
            "ca_crt in \\[auth\\] must be a string, not int",
        ),
        ('auth = "x"\n', "auth must be a table"),
        ('[auth]\nca_crt = ""\n', "ca_crt in \\[auth\\] is empty"),
        (
            '[auth]\nca_crt = "/a"\nclient_crt = "/c"\nclient_key = "/k"\n',
            "missing socket in \\[system\\]",
        ),
        (
            '[auth]\nca_crt = "/a"\nclient_crt = "/c"\nclient_key = "/k"\n[system]\nsocket = "1.2.3.4:99999"\n',
            "port 99999 is out of range",
        ),
    ],
    ids=["syntax", "type", "not-a-table", "empty", "no-socket", "bad-socket"],
)
def test_bad_files_say_what_is_wrong(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "config"
    path.write_text(content)

    with pytest.raises(ConfigError, match=message) as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read config file {tmp_path}: Is a directory"):
        load_config(tmp_path)


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "config").write_bytes(b'[auth]\nca_crt = "\xff"\n')

    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(tmp_path / "config")


def test_empty_argument(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the socket argument is empty"):
        load_config(write_config(tmp_path / "config"), socket="")


def test_credentials_name_an_unreadable_file(tmp_path: Path) -> None:
    paths = pki.init_pki(tmp_path / "pki")
    paths.clients[0].key.unlink()
    config = load_config(paths.config)

    with pytest.raises(
        ConfigError, match=f"cannot read client_key {paths.clients[0].key}"
    ) as error:
        channel_credentials(config)
    assert str(paths.config) in str(error.value)


def test_credentials_refuse_a_file_that_is_not_pem(tmp_path: Path) -> None:
    paths = pki.init_pki(tmp_path / "pki")
    paths.ca_crt.write_text("not a certificate")

    with pytest.raises(ConfigError, match=f"ca_crt {paths.ca_crt} .* is not a PEM file"):
        channel_credentials(load_config(paths.config))


def test_channel_options_name_the_server() -> None:
    for socket in ("/run/aurae.sock", "127.0.0.1:8080"):
        assert channel_options(parse_target(socket)) == [
            ("grpc.ssl_target_name_override", TLS_SERVER_NAME),
            ("grpc.default_authority", TLS_SERVER_NAME),
        ]


def test_importing_config_stays_cheap() -> None:
    # The SDK imports this module at import time; grpc (and cryptography) must wait for a channel.
    code = (
        "import sys, aurae_sdk.config; print(sorted({'grpc', 'cryptography'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# --- socket forms -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("socket", "grpc_target", "display"),
    [
        (
            "/var/run/aurae/aurae.sock",
            "unix:/var/run/aurae/aurae.sock",
            "/var/run/aurae/aurae.sock",
        ),
        ("unix:/var/run/aurae.sock", "unix:/var/run/aurae.sock", "/var/run/aurae.sock"),
        ("unix:///var/run/aurae.sock", "unix:/var/run/aurae.sock", "/var/run/aurae.sock"),
        ("/run/a b/%41#?.sock", "unix:/run/a%20b/%2541%23%3F.sock", "/run/a b/%41#?.sock"),
        ("127.0.0.1:8080", "ipv4:127.0.0.1:8080", "127.0.0.1:8080"),
        ("[::1]:8080", "ipv6:[::1]:8080", "[::1]:8080"),
        ("[FE80:0::1%eth0]:8080", "ipv6:[fe80::1%25eth0]:8080", "[fe80::1%eth0]:8080"),
        ("[fe80::1%4]:1", "ipv6:[fe80::1%254]:1", "[fe80::1%4]:1"),
        # Upstream Aurae's own spelling: the zone after the port.
        ("[fe80::2]:8080%4", "ipv6:[fe80::2%254]:8080", "[fe80::2%4]:8080"),
        ("localhost:65535", "dns:///localhost:65535", "localhost:65535"),
        ("aurae.example.com:443", "dns:///aurae.example.com:443", "aurae.example.com:443"),
    ],
)
def test_socket_forms(socket: str, grpc_target: str, display: str) -> None:
    target = parse_target(socket)

    assert (target.grpc_target, target.display, str(target)) == (grpc_target, display, display)
    assert target.kind == ("unix" if grpc_target.startswith("unix:") else "tcp")


@pytest.mark.parametrize(
    ("socket", "relative", "encoded"),
    [
        ("aurae.sock", "aurae.sock", "aurae.sock"),
        ("./aurae.sock", "aurae.sock", "aurae.sock"),
        ("unix:aurae.sock", "aurae.sock", "aurae.sock"),
        ("run/a:b.sock", "run/a:b.sock", "run/a%3Ab.sock"),
    ],
)
def test_relative_unix_paths_are_relative_to_the_working_directory(
    socket: str, relative: str, encoded: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    target = parse_target(socket)

    assert target == Target("unix", f"unix:{tmp_path}/{encoded}", f"{tmp_path}/{relative}")


def test_home_unix_path(home: Path) -> None:
    assert parse_target("~/aurae.sock").display == str(home / "aurae.sock")
    assert parse_target("unix:~/aurae.sock").display == str(home / "aurae.sock")


@pytest.mark.parametrize(
    ("socket", "message"),
    [
        ("", "the socket is empty"),
        ("   ", "the socket is empty"),
        ("127.0.0.1", "has no port"),
        ("::1", "in brackets, with a port"),
        ("fe80::1%eth0", "in brackets, with a port"),
        ("127.0.0.1:", "has no port after ':'"),
        ("localhost:", "has no port after ':'"),
        ("[::1]", "has no port"),
        ("[::1]:", "has no port after ':'"),
        ("127.0.0.1:0", "port 0 is out of range"),
        ("127.0.0.1:65536", "port 65536 is out of range"),
        ("localhost:http", "port 'http' is not a number"),
        ("[::1]:８０", "is not a number"),
        ("::1:8080", "in brackets, with a port"),  # itself a valid IPv6 address
        ("fe80::1:x:80", "in brackets, with a port"),
        ("[fe80::1%]:80", "the zone after '%' must be"),
        ("[fe80::1%eth0]:80%4", "two zones"),
        ("[nope]:80", "'nope' is not an IPv6 address"),
        ("[::1]80", "write an IPv6 address as"),
        ("256.1.1.1:80", "'256.1.1.1' is not an IPv4 address"),
        ("bad_host!:80", "is not a host name or IP address"),
        ("tcp://127.0.0.1:80", "not a URL"),
        ("unix://host/path", "write unix:/absolute/path"),
        ("/" + "x" * 200, "is 201 bytes long; Linux allows 107"),
    ],
)
def test_bad_sockets_are_rejected_clearly(socket: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_target(socket)


# --- every form, connected for real -------------------------------------------------------------


@pytest.fixture(scope="module")
def link_local() -> Iterator[tuple[str, str, int]]:
    """(address, interface, index): fe80::1 on a TAP device of this test's own, removed after.

    Borrowing a host interface's address made the test depend on the machine (and once on
    another run's TAP device vanishing mid-test); a device of our own is always there.
    """
    if os.geteuid() != 0:
        pytest.skip("making a TAP device needs root")
    interface = f"aucfg{os.getpid() % 1_000_000}"
    subprocess.run(["ip", "tuntap", "add", "dev", interface, "mode", "tap"], check=True)
    try:
        subprocess.run(
            ["ip", "addr", "add", "fe80::1/64", "dev", interface, "nodad"], check=True
        )
        subprocess.run(["ip", "link", "set", interface, "up"], check=True)
        yield "fe80::1", interface, if_nametoindex(interface)
    finally:
        subprocess.run(["ip", "link", "del", interface], check=False)


class EchoServer:
    """An mTLS grpc server with one method, /test.Echo/Ping, started from a PKI's files."""

    def __init__(self, paths: pki.PkiPaths, listen: str) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("test.Echo", {"Ping": handler})]
        )
        credentials = grpc.ssl_server_credentials(
            [(paths.server_key.read_bytes(), paths.server_crt.read_bytes())],
            root_certificates=paths.ca_crt.read_bytes(),
            require_client_auth=True,
        )
        self.port = self._server.add_secure_port(listen, credentials)

    def __enter__(self) -> Self:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)


@pytest.fixture
def pki_paths(tmp_path: Path) -> pki.PkiPaths:
    return pki.init_pki(tmp_path / "pki")


def ping_through_config(paths: pki.PkiPaths, socket: str) -> bytes:
    """Load the PKI's config with `socket` and make one mTLS call the way the SDK does."""
    config = load_config(paths.config, socket=socket)
    target = config.target
    credentials = channel_credentials(config)
    with grpc.secure_channel(target.grpc_target, credentials, channel_options(target)) as channel:
        call = channel.unary_unary(
            "/test.Echo/Ping", request_serializer=None, response_deserializer=None
        )
        response: bytes = call(b"ping", timeout=10)
        return response


TCP_FORMS = [
    pytest.param("127.0.0.1:0", "127.0.0.1:{port}", id="ipv4"),
    pytest.param("[::1]:0", "[::1]:{port}", id="ipv6"),
    pytest.param("localhost:0", "localhost:{port}", id="hostname"),
]
# {address}, {interface} and {index} come from the link_local fixture.
LINK_LOCAL_FORMS = [
    pytest.param(
        "[{address}%{interface}]:0", "[{address}%{interface}]:{port}", id="link-local-%name"
    ),
    pytest.param("[{address}%{interface}]:0", "[{address}%{index}]:{port}", id="link-local-%index"),
    pytest.param(
        "[{address}%{interface}]:0", "[{address}]:{port}%{index}", id="link-local-upstream-spelling"
    ),
]


@pytest.mark.parametrize(("listen", "socket"), TCP_FORMS)
def test_tcp_forms_connect(pki_paths: pki.PkiPaths, listen: str, socket: str) -> None:
    with EchoServer(pki_paths, listen) as server:
        assert ping_through_config(pki_paths, socket.format(port=server.port)) == b"ping"


@pytest.mark.parametrize(("listen", "socket"), LINK_LOCAL_FORMS)
def test_link_local_forms_connect(
    pki_paths: pki.PkiPaths, link_local: tuple[str, str, int], listen: str, socket: str
) -> None:
    address, interface, index = link_local
    with EchoServer(pki_paths, listen.format(address=address, interface=interface)) as server:
        target = socket.format(address=address, interface=interface, index=index, port=server.port)
        assert ping_through_config(pki_paths, target) == b"ping"


def test_link_local_without_its_zone_does_not_connect(
    pki_paths: pki.PkiPaths, link_local: tuple[str, str, int]
) -> None:
    address, interface, _ = link_local
    with (
        EchoServer(pki_paths, f"[{address}%{interface}]:0") as server,
        pytest.raises(grpc.RpcError) as failure,
    ):
        ping_through_config(pki_paths, f"[{address}]:{server.port}")
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "socket",
    ["{dir}/aurae.sock", "unix:{dir}/aurae.sock", "unix://{dir}/aurae.sock", "aurae.sock"],
    ids=["path", "unix-scheme", "unix-empty-authority", "relative"],
)
def test_unix_forms_connect(
    tmp_path: Path, pki_paths: pki.PkiPaths, monkeypatch: pytest.MonkeyPatch, socket: str
) -> None:
    # Characters grpc would otherwise percent-decode or take as a query or fragment.
    run = tmp_path / "run dir %41 #?"
    run.mkdir()
    monkeypatch.chdir(run)
    with EchoServer(pki_paths, parse_target(str(run / "aurae.sock")).grpc_target):
        assert ping_through_config(pki_paths, socket.format(dir=run)) == b"ping"
