"""Command line of `auraed`, with Aurae's flags and defaults."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from aurae_sdk.wire import paths
from auraed import __version__
from auraed.admission import Budget


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="auraed",
        description="The Aurae node runtime daemon: cells, executables and observability "
        "over an mTLS gRPC API.",
    )
    parser.add_argument("--version", action="version", version=f"auraed {__version__}")
    parser.add_argument("--socket", default=paths.DEFAULT_SOCKET,
                        help="Unix socket path, or IP:PORT / [IPv6]:PORT to listen on "
                             "(default: %(default)s)")
    parser.add_argument("--ca-crt", type=Path, default=Path(paths.DEFAULT_CA_CRT),
                        help="CA certificate that signs client certificates (default: %(default)s)")
    parser.add_argument("--server-crt", type=Path,
                        default=Path(paths.DEFAULT_SERVER_CRT),
                        help="server certificate (default: %(default)s)")
    parser.add_argument("--server-key", type=Path, default=Path(paths.DEFAULT_SERVER_KEY),
                        help="server private key (default: %(default)s)")
    parser.add_argument("--runtime-dir", type=Path, default=Path(paths.RUNTIME_DIR),
                        help="where runtime state and captured output live (default: %(default)s)")
    parser.add_argument("--library-dir", type=Path, default=Path(paths.LIBRARY_DIR),
                        help="where persistent data lives (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="logfmt lines or JSON lines on stderr (default: %(default)s)")
    parser.add_argument("--cgroup-root", default="aurae",
                        help="name of the daemon's own cgroup subtree (default: %(default)s)")
    parser.add_argument("--cgroup-mount", default="/sys/fs/cgroup", metavar="DIR",
                        help="where the cgroup filesystem is mounted: a cgroup2 mount (v2), or "
                             "a tmpfs of v1 hierarchies (default: %(default)s)")
    parser.add_argument("--grace-period", type=float, default=10.0, metavar="SECONDS",
                        help="how long Stop and shutdown wait after SIGTERM before SIGKILL "
                             "(default: %(default)s)")
    parser.add_argument("--authz-policy", type=Path, metavar="FILE",
                        help="YAML or JSON file of deny and allow rules over client SPIFFE IDs "
                             "and methods (see docs/security.md); without it every client "
                             "certificate the CA signed may call everything")
    parser.add_argument("--operator", action="append", metavar="PRINCIPAL",
                        help="SPIFFE ID (or spiffe://td/prefix/*) of an operator, whose "
                             "long-lived calls draw on a reserve no other client can take; "
                             "repeat for several (default: spiffe://unsafe.aurae.io/admin)")
    parser.add_argument("--long-lived-per-peer", type=_positive, default=Budget.per_peer,
                        metavar="N", help="streams, Wait and Stop calls one client identity "
                                          "may have running at once (default: %(default)s)")
    parser.add_argument("--long-lived-total", type=_positive, default=Budget.total, metavar="N",
                        help="long-lived calls all non-operator clients together may have "
                             "running at once (default: %(default)s)")
    parser.add_argument("--long-lived-operators", type=_positive, default=Budget.operators,
                        metavar="N", help="long-lived calls operators together may have "
                                          "running at once (default: %(default)s)")
    parser.add_argument("--cri-socket", type=Path, metavar="PATH",
                        help="also serve the Kubernetes CRI (runtime.v1 RuntimeService and "
                             "ImageService) for kubelet, plaintext on this Unix socket of mode "
                             "0600 (see docs/cri.md)")
    parser.add_argument("--cri-pods", choices=("instances", "cells"), default="instances",
                        help="what a pod sandbox is: a spawned instance of this daemon whose "
                             "cells run the pod's containers (default), or a cell of this "
                             "daemon (what the daemon inside a pod instance serves)")
    parser.add_argument("--cri-pod-spares", type=_not_negative, default=1, metavar="N",
                        help="pod instances to keep started ahead, each waiting for a pod "
                             "that does not share the node's namespaces (0: none; the first "
                             "pod starts them; default: %(default)s)")
    parser.add_argument("--image-store", type=Path, metavar="DIR",
                        help="read images from this store, another daemon's, instead of the "
                             "library dir's own; read-only (a pod instance borrows its host's)")
    parser.add_argument("--metrics-address", metavar="ADDRESS",
                        help="serve Prometheus metrics (per-cell CPU, memory, pids, OOM kills) "
                             "over plain HTTP on a Unix socket path or a loopback HOST:PORT; "
                             "off by default")
    parser.add_argument("--metrics-allow-remote", action="store_true",
                        help="allow --metrics-address on a non-loopback TCP address (the "
                             "endpoint has no authentication)")
    parser.add_argument("--live-restore", action="store_true",
                        help="on SIGTERM/SIGINT leave every cell and executable running for the "
                             "next auraed to adopt (a planned restart or upgrade); without it "
                             "they are stopped with grace. A crashed auraed always leaves them "
                             "running (see docs/daemon.md)")
    parser.add_argument("--ca-key", type=Path, metavar="FILE",
                        help="private key of --ca-crt; lets the daemon mint the server "
                             "identities of its virtual machines' guests (without it VMs "
                             "cannot start)")
    parser.add_argument("--vm-image-dir", type=Path, default=Path("/var/lib/aurae/vm-images"),
                        metavar="DIR", help="cache of guest kernels and initramfs images, "
                                            "built by `auraed vm-image` (default: %(default)s)")
    parser.add_argument("--vm-accelerator", choices=("auto", "kvm", "tcg"), default="auto",
                        help="QEMU accelerator for guests; auto: KVM if a probe boot under it "
                             "succeeds, else TCG (default: %(default)s)")
    parser.add_argument("--vm-boot-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="how long Start waits for a guest's auraed to answer "
                             "(default: %(default)s)")
    parser.add_argument("--vm-grace-period", type=float, default=30.0, metavar="SECONDS",
                        help="how long Stop and shutdown wait for a guest to power off before "
                             "a hard stop (default: %(default)s)")
    parser.add_argument("--vm-health-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long a guest re-adopted after a restart may take to answer "
                             "its health check before List says Unresponsive (default: "
                             "%(default)s)")
    parser.add_argument("--serve-early", action="store_true",
                        help="answer Health and Discovery as soon as the server listens and "
                             "wire the other services behind it; their calls wait until they "
                             "are wired (what a VM guest's auraed does: docs/vms.md)")
    parser.add_argument("--standby", type=Path, metavar="PATH",
                        help="start as a spare: do everything that does not depend on the "
                             "cgroup root, then wait for a claim on this Unix socket giving it "
                             "(and a hostname) before serving; what a spare pod instance runs "
                             "(see docs/cri.md)")
    return parser.parse_args(argv)


def _not_negative(text: str) -> int:
    return 0 if text.strip() == "0" else _positive(text)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def spawn_main(argv: list[str]) -> None:
    """`auraed spawn -o DIR`: write an OCI bundle that boots a nested auraed."""
    parser = argparse.ArgumentParser(
        prog="auraed spawn",
        description="Write an OCI runtime bundle (config.json + rootfs) whose init is auraed; "
        "`runc run --bundle DIR NAME` boots it, and its socket appears at DIR/run/aurae.sock.")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                        help="the bundle directory to create (empty or missing)")
    parser.add_argument("--pki", type=Path, required=True, metavar="DIR",
                        help="a PKI directory with ca.crt and ca.key (`aurae-py pki init`); "
                        "the bundle gets an identity that CA signs, never its key")
    parser.add_argument("--name", default="bundle",
                        help="the bundle's hostname and the last segment of its SPIFFE ID")
    parser.add_argument("--parent", default="spiffe://unsafe.aurae.io/auraed",
                        help="the SPIFFE ID the bundle's identity is minted under")
    args = parser.parse_args(argv)
    from auraed.runtime.bundle import BundleError, write_bundle

    try:
        written = write_bundle(args.output, args.pki, name=args.name, parent=args.parent)
    except BundleError as error:
        print(f"auraed spawn: {error}", file=sys.stderr)
        sys.exit(2)
    print(written)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["spawn"]:
        spawn_main(argv[1:])
        return
    if argv[:1] == ["vm-image"]:
        from auraed.kernel.guest_image import main as vm_image

        sys.exit(vm_image(argv[1:]))
    seed = None
    from auraed.kernel import template

    if template.is_copy():
        from auraed.kernel.spawner.client import SpawnerSeed

        # A spawned instance's spawner, forked before anything else runs: whatever the copy
        # writes before this fork (the parser, the settings) the seed would hold a page of its
        # own for, once the copy writes it again (2 MiB per instance, measured).
        seed = SpawnerSeed.fork()
    elif "--serve-early" in argv:
        # A VM guest's daemon: its spawner is forked now, before the imports (the seed's own
        # are the standard library's), rather than started as a `python -S` in the middle of
        # the wiring, where that interpreter's start-up under TCG was the largest part
        # (docs/vms.md). It keeps its spare, as a started spawner does.
        from auraed.kernel.spawner.seed import SpawnerSeed as GuestSeed

        seed = GuestSeed.fork(keeps_spare=True)
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("auraed: must run as root (it manages cgroups and processes)", file=sys.stderr)
        sys.exit(2)
    from auraed.server import Daemon, Settings

    settings = Settings(
        socket=args.socket,
        ca_crt=args.ca_crt,
        server_crt=args.server_crt,
        server_key=args.server_key,
        runtime_dir=args.runtime_dir,
        library_dir=args.library_dir,
        verbose=args.verbose,
        log_format=args.log_format,
        cgroup_root=args.cgroup_root,
        cgroup_mount=args.cgroup_mount,
        grace_period=args.grace_period,
        authz_policy=args.authz_policy,
        budget=Budget(per_peer=args.long_lived_per_peer, total=args.long_lived_total,
                      operators=args.long_lived_operators),
        **({"operators": tuple(args.operator)} if args.operator else {}),
        cri_socket=args.cri_socket,
        cri_pods=args.cri_pods,
        cri_pod_spares=args.cri_pod_spares,
        image_store=args.image_store,
        metrics_address=args.metrics_address,
        metrics_allow_remote=args.metrics_allow_remote,
        live_restore=args.live_restore,
        ca_key=args.ca_key,
        vm_image_dir=args.vm_image_dir,
        vm_accelerator=args.vm_accelerator,
        vm_boot_timeout=args.vm_boot_timeout,
        vm_grace_period=args.vm_grace_period,
        vm_health_timeout=args.vm_health_timeout,
        serve_early=args.serve_early,
        standby=args.standby,
    )
    sys.exit(Daemon(settings, spawner_seed=seed).run())


if __name__ == "__main__":
    main()
