"""``ambimesh-controller``: config store + one source (a YAML directory or the Kubernetes
API) + CA + push API on one gRPC port, and its metrics on another (HTTP)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from http.server import ThreadingHTTPServer
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.process_collector import ProcessCollector

from controller.auth import (
    JoinTokensFirst,
    NodeAuthenticator,
    TokenAuthenticator,
    TokensFileError,
)
from controller.ca import ROOT_CERT_FILE, CAError, CertificateAuthority
from controller.ca_service import CertificateService
from controller.metrics import ControllerCollector
from controller.push_service import DiscoveryService, add_to_server
from controller.quoting import quote
from controller.sources.files import DirectoryWatcher
from controller.sources.kubernetes import KubernetesSource
from controller.sources.kubernetes_api import KubeApi
from controller.store import Store
from controller.tokenreview import (
    DEFAULT_AUDIENCE,
    DEFAULT_NODE_ACCOUNTS,
    TokenReviewAuthenticator,
)
from controller.translate import ConfigError, Memo, Settings, SourcedObject, translate
from mesh.api import mesh_pb2_grpc
from mesh.http_endpoints import metrics_routes, serve_in_thread, stop_serving
from mesh.keepalive import KEEPALIVE, Keepalive
from mesh.version import add_version_flag

log = logging.getLogger("controller")

DEFAULT_LISTEN = "0.0.0.0:15012"
# istiod serves its metrics on 15014, which on a node is the agent's: a controller on a
# host that is also a node must not collide with it.
DEFAULT_METRICS_LISTEN = "0.0.0.0:15016"
DEFAULT_STATE_DIR = "/var/lib/ambimesh/controller"
_WILDCARDS = ("", "0.0.0.0", "::")


class StartupError(Exception):
    """The controller cannot start; the message is the one line the operator sees."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ambimesh-controller", description=__doc__)
    add_version_flag(p)
    p.add_argument(
        "--source",
        choices=["files", "kubernetes"],
        default="files",
        help="where the configuration comes from (one at a time; default: files)",
    )
    p.add_argument(
        "--config-dir", type=Path, help="directory of Kubernetes-style YAML (--source files)"
    )
    p.add_argument(
        "--kubeconfig",
        type=Path,
        help="kubeconfig for --source kubernetes (default: in-cluster config inside a pod, "
        "else $KUBECONFIG or ~/.kube/config)",
    )
    p.add_argument("--state-dir", type=Path, default=Path(DEFAULT_STATE_DIR), help="CA material")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT for push + CA gRPC")
    p.add_argument(
        "--metrics-listen",
        default=DEFAULT_METRICS_LISTEN,
        help="HOST:PORT for Prometheus metrics over HTTP, /metrics (docs/metrics.md)",
    )
    p.add_argument(
        "--serving-hosts",
        type=_comma_list,
        help="comma-separated DNS names/IPs for the serving certificate (default: the listen host)",
    )
    p.add_argument(
        "--tokens",
        type=Path,
        help="YAML mapping node name -> join token (required with --source files; on "
        "Kubernetes, for hosts outside the cluster)",
    )
    p.add_argument(
        "--token-audience",
        default=DEFAULT_AUDIENCE,
        help="audience of the nodes' projected service-account tokens (--source kubernetes)",
    )
    p.add_argument(
        "--node-service-accounts",
        type=_comma_list,
        default=list(DEFAULT_NODE_ACCOUNTS),
        help="comma-separated NAMESPACE/NAME of the node DaemonSet's service accounts: they "
        "act for their node (--source kubernetes)",
    )
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--root-namespace", default="istio-system")
    p.add_argument("--cluster-domain", default="cluster.local")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = p.parse_args(argv)
    if args.source == "files" and (args.config_dir is None or args.tokens is None):
        p.error("--source files needs --config-dir and --tokens")
    return args


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def split_host_port(
    listen: str, flag: str = "--listen", example: str = DEFAULT_LISTEN
) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise StartupError(f"{flag} {quote(listen)}: expected HOST:PORT, e.g. {example}")
    return host.strip("[]"), int(port)


def serving_hosts(listen_host: str, explicit: list[str] | None) -> list[str]:
    if explicit:
        return explicit
    if listen_host in _WILDCARDS:
        return [socket.gethostname(), "localhost", "127.0.0.1"]
    return [listen_host]


def grpc_server(
    store: Store,
    authenticator: NodeAuthenticator,
    ca: CertificateAuthority,
    keepalive: Keepalive = KEEPALIVE,
    discovery: DiscoveryService | None = None,
) -> grpc.aio.Server:
    """The push and CA services on one server, accepting the nodes' keepalive pings; both
    count into the discovery service's metrics."""
    # A second controller on the same port must fail, not silently share it.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *keepalive.server_options()])
    discovery = discovery or DiscoveryService(store, authenticator)
    add_to_server(discovery, server)
    certificates = CertificateService(ca, store, authenticator, discovery.metrics.certificates)
    mesh_pb2_grpc.add_CertificateAuthorityServicer_to_server(certificates, server)
    return server


async def serve(args: argparse.Namespace) -> None:
    host, _ = split_host_port(args.listen)
    metrics_address = split_host_port(
        args.metrics_listen, "--metrics-listen", DEFAULT_METRICS_LISTEN
    )
    try:
        ca = CertificateAuthority.load_or_create(args.state_dir, args.trust_domain)
    except (CAError, OSError) as e:
        raise StartupError(f"CA state in {args.state_dir}: {e}") from None
    store = Store()
    settings = Settings(args.trust_domain, args.root_namespace, args.cluster_domain)

    memo = Memo()

    def apply(objects: list[SourcedObject]) -> None:
        store.replace(translate(objects, settings, store.current.resources, memo))

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    api = await _kube_api(args) if args.source == "kubernetes" else None
    try:
        authenticator = _authenticator(args, api)
        discovery = DiscoveryService(store, authenticator)
        source: DirectoryWatcher | KubernetesSource
        source = _files_source(args, apply) if api is None else KubernetesSource(api, apply)
        metrics = _serve_metrics(metrics_address, discovery, ca, store, source)
        watch = asyncio.create_task(source.run())
        try:
            if isinstance(source, KubernetesSource):
                log.info("waiting for a first valid configuration from the API server")
                if not await _first(source.applied.wait(), stopping.wait(), watch):
                    return
            _freeze_loaded()
            await _serve_grpc(args, host, store, authenticator, ca, discovery, stopping)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            stop_serving(metrics)
    finally:
        if api is not None:
            await api.close()


def _serve_metrics(
    address: tuple[str, int],
    discovery: DiscoveryService,
    ca: CertificateAuthority,
    store: Store,
    source: DirectoryWatcher | KubernetesSource,
) -> ThreadingHTTPServer:
    """``/metrics`` in its own thread (a scrape never stalls the push streams)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(
        ControllerCollector(
            discovery.metrics,
            connected_streams=discovery.connected_streams,
            root_not_after=ca.root_not_after.timestamp(),
            config_serial=lambda: store.current.serial,
            config_rejects=lambda: source.rejected,
        )
    )
    try:
        server = serve_in_thread(address, metrics_routes(registry))
    except OSError as e:
        raise StartupError(
            f"cannot serve metrics on {address[0] or '*'}:{address[1]} ({e.strerror}): "
            "choose another HOST:PORT with --metrics-listen"
        ) from None
    log.info("serving metrics on http://%s:%d/metrics", address[0] or "*", address[1])
    return server


def _freeze_loaded() -> None:
    """Keep the first configuration out of the garbage collector's later passes: a large
    one is some 200,000 container objects (the sources' mappings, the memo) that every
    full collection would otherwise walk again (8 % of the event loop's time during a
    relabel at 10,000 pods, bench/controller_scale.py --profile). Refcounting still
    frees them when they are replaced."""
    gc.collect()
    gc.freeze()


async def _kube_api(args: argparse.Namespace) -> KubeApi:
    try:
        return await KubeApi.connect(args.kubeconfig)
    except Exception as e:  # kubernetes-asyncio's config errors have no common base
        where = args.kubeconfig or "in-cluster config, $KUBECONFIG or ~/.kube/config"
        raise StartupError(f"cannot load Kubernetes API access from {where}: {e}") from None


def _authenticator(args: argparse.Namespace, api: KubeApi | None) -> NodeAuthenticator:
    try:
        join = TokenAuthenticator(args.tokens) if args.tokens is not None else None
    except TokensFileError as e:
        raise StartupError(f"{e} (--tokens)") from None
    if api is None:
        assert join is not None  # parse_args requires --tokens with --source files
        return join
    review = TokenReviewAuthenticator(api, args.token_audience, args.node_service_accounts)
    return review if join is None else JoinTokensFirst(join, review)


def _files_source(
    args: argparse.Namespace, apply: Callable[[list[SourcedObject]], None]
) -> DirectoryWatcher:
    if not args.config_dir.is_dir():
        raise StartupError(
            f"config directory {args.config_dir} does not exist: create it or fix --config-dir"
        )
    watcher = DirectoryWatcher(args.config_dir, apply)
    try:
        watcher.load_once()
    except ConfigError as e:
        raise StartupError(f"initial configuration rejected: {e}") from None
    return watcher


async def _first(
    ready: Awaitable[object], stopping: Awaitable[object], source: asyncio.Task[None]
) -> bool:
    """Whether ``ready`` came before a stop request or the end of ``source`` (a bug)."""
    waits = [asyncio.ensure_future(ready), asyncio.ensure_future(stopping)]
    await asyncio.wait([*waits, source], return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    if source.done():
        source.result()  # raises what ended it
    return waits[0].done() and not waits[0].cancelled()


async def _serve_grpc(
    args: argparse.Namespace,
    host: str,
    store: Store,
    authenticator: NodeAuthenticator,
    ca: CertificateAuthority,
    discovery: DiscoveryService,
    stopping: asyncio.Event,
) -> None:
    """Serves push + CA until ``stopping``; never before a valid configuration is in
    ``store`` (an empty one would have every node drop its pods)."""
    serving = ca.serving_cert(serving_hosts(host, args.serving_hosts))
    server = grpc_server(store, authenticator, ca, discovery=discovery)
    credentials = grpc.ssl_server_credentials([(serving.key_pem, serving.chain_pem)])
    try:
        bound = server.add_secure_port(args.listen, credentials)
    except RuntimeError:
        bound = 0
    if not bound:
        raise StartupError(f"cannot listen on {args.listen}: port in use or address not local")
    await server.start()
    log.info(
        "serving push + CA on %s:%d (root certificate: %s)",
        host or "*",
        bound,
        args.state_dir / ROOT_CERT_FILE,
    )
    try:
        await stopping.wait()
        log.info("shutting down")
    finally:
        discovery.close()
        await server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(args))
    except StartupError as e:
        log.error("%s", e)
        return 1
    return 0
