"""ztunnel on several cores (``--workers N``, N > 1): one master, one supervisor, N workers.

- The **master** is the process started (its pid is the one readiness names). Everything
  is imported before it forks, and it never starts a thread, an event loop or gRPC, so
  every fork is clean (gRPC's core does not survive a fork of a process that used it) and
  the children share the imported code's pages. It forks the supervisor and the workers,
  re-forks a worker that dies while the others serve on, forwards SIGTERM/SIGINT, and
  exits when all are gone.
- The **supervisor** is the node's one face: the agent's ztunnel (so a generation's
  workers never supersede each other at the agent), the CA client (one certificate fetch
  per identity for the node), :15020 (the workers' counters summed), :15021 and the
  admin view. It hands every pod to every worker with the pod's netns fd.
- Each **worker** is a whole data path on its own event loop: it binds its own
  ``SO_REUSEPORT`` listeners in every pod's netns (the kernel spreads new connections over
  the group, as over two generations during a handover; a listener that closes passes its
  queued connections on, ``tcp_migrate_req``), has its own push stream and HBONE pools,
  and asks the supervisor for certificates.

The agent holds one worker's 15006 listener per pod (``sk_lookup`` then picks among the
reuseport group). When that worker dies the supervisor drops its agent session, and the
re-sync hands the agent a surviving worker's listener.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from functools import partial
from types import FrameType
from typing import Any, TypeVar

import uvloop
from prometheus_client import CollectorRegistry, disable_created_metrics

from mesh.api import node_pb2
from mesh.cert_manager import CertManager
from mesh.cert_metrics import CertCollector
from mesh.http_endpoints import metrics_routes, serve_in_thread, stop_serving
from mesh.log_format import SecondCachedFormatter
from mesh.netns import Netns
from mesh.node_config import ControllerAccess
from mesh.proxy_process import drain_signals, start_push
from mesh.spiffe import SpiffeId
from mesh.tls import TlsIdentity
from ztunnel.admin import admin_routes_of, readiness_routes, state_dump
from ztunnel.connections import ConnectionTable
from ztunnel.context import ProxyContext
from ztunnel.fastpath_maps import from_flags
from ztunnel.inpod import InpodClient
from ztunnel.metrics import TcpMetrics
from ztunnel.node_certs import NodeCertificates
from ztunnel.node_metrics import Families, Totals, WorkersCollector, families_of
from ztunnel.proxy import Ztunnel, ZtunnelNotReady
from ztunnel.worker_link import Body, Handler, LinkClosed, WorkerLink

log = logging.getLogger("ztunnel.workers")

SUPERVISOR = -1  # the master's role key for the supervisor; workers are 0..N-1
_SPAWNED = struct.Struct("=ii")  # master -> supervisor: (worker index, pid) + its link fd
# A worker that dies this soon after it started is re-forked only after a pause.
MIN_LIFETIME_SECONDS = 5.0
RESPAWN_PAUSE_SECONDS = 1.0
# A new worker waits up to 5 s for its first config per pod (Ztunnel.add_pod).
ADD_TIMEOUT = 15.0
SYNC_ATTEMPTS = 60
SYNC_RETRY_SECONDS = 1.0
STATUS_TIMEOUT = 2.0
SCRAPE_TIMEOUT = 5.0
CERT_TIMEOUT = 60.0
# After SIGTERM the supervisor keeps answering draining workers (certificate renewals).
DRAIN_MARGIN_SECONDS = 30.0

T = TypeVar("T")


# -- master ---------------------------------------------------------------------------


def run_master(args: argparse.Namespace) -> int:
    """Fork the supervisor and ``args.workers`` workers, keep the workers up; the
    supervisor's exit code."""
    gc.freeze()  # keep the imported objects' pages shared: the children's GC skips them
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    master = _Master(args, ours)
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the first fork: no child orphaned
        signal.signal(sig, master.on_signal)
    master_pid = os.getpid()
    master.fork(SUPERVISOR, lambda: uvloop.run(supervise(args, theirs, master_pid)), [ours])
    theirs.close()
    for index in range(args.workers):
        master.spawn(index)
    log.info("ztunnel master (pid %d): supervisor and %d workers", master_pid, args.workers)
    return master.wait()


class _Master:
    def __init__(self, args: argparse.Namespace, supervisor: socket.socket) -> None:
        self.args = args
        self.supervisor = supervisor
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (role, started)
        self.stopping = False

    def fork(self, role: int, body: Callable[[], None], close: Iterable[socket.socket]) -> int:
        name = "supervisor" if role == SUPERVISOR else f"worker-{role}"
        # No signal between fork and the child's own handlers may run the master's.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for sock in close:
                    sock.close()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                _label_logs(name)
                body()
                code = 0
            except Exception:
                log.exception("%s failed", name)
            finally:
                logging.shutdown()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.children[pid] = (role, time.monotonic())
        return pid

    def spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = self.fork(index, lambda: uvloop.run(work(self.args, theirs)), [ours, self.supervisor])
        theirs.close()
        try:
            socket.send_fds(self.supervisor, [_SPAWNED.pack(index, pid)], [ours.fileno()])
        except OSError as exc:  # the supervisor is gone: the worker sees its link closed
            log.warning("cannot introduce worker %d to the supervisor: %s", index, exc)
        finally:
            ours.close()

    def wait(self) -> int:
        supervisor_code = 0
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            role, started = self.children.pop(pid, (None, 0.0))
            if role is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if role == SUPERVISOR:
                supervisor_code = code
                if not self.stopping:
                    # A crash of the node's ztunnel, as one process crashing would be: a
                    # drain would keep the node without listeners (the workers close theirs)
                    # and hold off the restart (systemd, the kubelet) for --drain-seconds.
                    log.error("supervisor (pid %d) exited (%d): ending the workers", pid, code)
                    self._stop(signal.SIGKILL)
                    supervisor_code = code or 1
            elif self.stopping or code == 0:  # drained, by signal or because told to
                log.info("worker %d (pid %d) exited (%d)", role, pid, code)
            else:
                log.warning("worker %d (pid %d) died (%d); starting another", role, pid, code)
                if time.monotonic() - started < MIN_LIFETIME_SECONDS:
                    time.sleep(RESPAWN_PAUSE_SECONDS)
                if not self.stopping:
                    self.spawn(role)
        return supervisor_code

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stop(signal.Signals(signum))

    def _stop(self, sig: signal.Signals) -> None:
        """Pass the signal on: everyone drains (SIGINT twice: cuts) on their own."""
        self.stopping = True
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _label_logs(role: str) -> None:
    """The process's role in each line; the formatter whose lines (the access lines) skip
    the `LogRecord` (`mesh.log_format`), as the single-process ztunnel's."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(
            SecondCachedFormatter(f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s")
        )


# -- supervisor -----------------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    index: int
    pid: int
    link: WorkerLink
    pods: set[str] = field(default_factory=set)  # uids it serves
    families: Families = field(default_factory=list)  # its samples at the last scrape
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one pod change at a time
    alive: bool = True


@dataclass(eq=False)
class _Pod:
    info: node_pb2.PodInfo
    netns: Netns  # lent to every worker, also those started later
    identity: SpiffeId


class Supervisor:
    def __init__(self, args: argparse.Namespace, certs: NodeCertificates) -> None:
        self.expected = int(args.workers)
        self.trust_domain = str(args.trust_domain)
        self.certs = certs
        self.workers: list[_Worker] = []  # oldest first
        self.pods: dict[str, _Pod] = {}
        self.acked_by: dict[str, _Worker] = {}  # whose 15006 listener the agent holds
        self.retired = Totals()
        self.inpod = InpodClient(
            args.agent_socket, self.add_pod, self.del_pod, self.known_pods, owns_listener_fds=True
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()

    # workers -------------------------------------------------------------------------
    async def follow_master(self, sock: socket.socket) -> None:
        """Adopt each worker the master forks, until the master goes away."""
        sock.setblocking(False)
        while True:
            try:
                data, fds, _flags, _ = socket.recv_fds(sock, _SPAWNED.size, 1)
            except BlockingIOError:
                await _readable(self._loop, sock)
                continue
            if not data:
                return
            if len(data) != _SPAWNED.size or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            index, pid = _SPAWNED.unpack(data)
            self.adopt(index, pid, socket.socket(fileno=fds[0]))

    def adopt(self, index: int, pid: int, sock: socket.socket) -> None:
        handlers: dict[str, Handler] = {"certificate": self._certificate}
        worker = _Worker(index, pid, WorkerLink(sock, handlers))
        self.workers.append(worker)
        log.info("worker %d (pid %d) joined", index, pid)
        self._spawn(self._run_worker(worker))

    async def _run_worker(self, worker: _Worker) -> None:
        sync = asyncio.create_task(self._sync(worker))
        try:
            await worker.link.run()
        finally:
            sync.cancel()
            worker.alive = False
            self.workers.remove(worker)
            self.retired.add(worker.families)
            log.warning("worker %d (pid %d) is gone", worker.index, worker.pid)
            orphaned = [uid for uid, w in self.acked_by.items() if w is worker]
            for uid in orphaned:
                del self.acked_by[uid]
            if orphaned:
                # The agent's SOCKHASH lost those pods' 15006 listener with the worker: a
                # re-sync hands it a surviving worker's.
                log.info("re-syncing with the agent for %d pods", len(orphaned))
                self.inpod.resync()

    async def _sync(self, worker: _Worker) -> None:
        """Give a (re)started worker every pod; a pod it cannot serve yet (no config in
        yet) is tried again."""
        for _ in range(SYNC_ATTEMPTS):
            missing = [pod for uid, pod in self.pods.items() if uid not in worker.pods]
            results = await asyncio.gather(
                *(self._add_to(worker, pod) for pod in missing), return_exceptions=True
            )
            failed = 0
            for pod, result in zip(missing, results, strict=True):
                if isinstance(result, int):
                    os.close(result)
                elif isinstance(result, BaseException):
                    failed += 1
                    log.info(
                        "worker %d: pod %s not served yet: %s", worker.index, pod.info.name, result
                    )
            if not failed:
                return
            await asyncio.sleep(SYNC_RETRY_SECONDS)
        log.error("worker %d: could not take every pod; it is not ready", worker.index)

    def live(self) -> list[_Worker]:
        return [w for w in self.workers if w.alive]

    async def _add_to(self, worker: _Worker, pod: _Pod) -> int | None:
        """The worker's 15006 listener fd for the pod (ours to close); None if the pod
        was replaced or removed meanwhile."""
        async with worker.lock:
            if self.pods.get(pod.info.uid) is not pod:
                return None
            netns = os.dup(pod.netns.fileno())  # ours for this call, whatever happens to pod
            try:
                _, fds = await worker.link.call(
                    "add_pod",
                    {"pod": base64.b64encode(pod.info.SerializeToString()).decode()},
                    (netns,),
                    timeout=ADD_TIMEOUT,
                )
            finally:
                os.close(netns)
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise LinkClosed(f"worker {worker.index} answered add_pod with {len(fds)} fds")
            worker.pods.add(pod.info.uid)
            return fds[0]

    async def _del_from(self, worker: _Worker, uid: str) -> None:
        async with worker.lock:
            worker.pods.discard(uid)
            await worker.link.call("del_pod", {"uid": uid})

    # the agent's requests ------------------------------------------------------------
    async def add_pod(self, info: node_pb2.PodInfo, netns_fd: int) -> int:
        """Every worker serves the pod; the agent gets the oldest one's 15006 listener."""
        pod = self.pods.get(info.uid)
        if pod is None or pod.netns.inode != os.fstat(netns_fd).st_ino:
            if pod is not None:
                pod.netns.close()
            sid = SpiffeId(self.trust_domain, info.namespace, info.service_account or "default")
            pod = _Pod(info, Netns.dup(netns_fd, f"pod {info.namespace}/{info.name}"), sid)
            self.pods[info.uid] = pod
        workers = self.live()
        if not workers:
            raise ZtunnelNotReady("no ztunnel worker is running yet")
        results = await asyncio.gather(
            *(self._add_to(w, pod) for w in workers), return_exceptions=True
        )
        fds = [r for r in results if isinstance(r, int)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors or len(fds) != len(workers):
            for fd in fds:
                os.close(fd)
            raise errors[0] if errors else ZtunnelNotReady("the pod was replaced meanwhile")
        for fd in fds[1:]:
            os.close(fd)
        self.acked_by[info.uid] = workers[0]
        return fds[0]

    async def del_pod(self, uid: str) -> None:
        pod = self.pods.pop(uid, None)
        self.acked_by.pop(uid, None)
        await asyncio.gather(*(self._del_from(w, uid) for w in self.live()), return_exceptions=True)
        if pod is not None:
            pod.netns.close()
        self.certs.forget({p.identity for p in self.pods.values()})

    def known_pods(self) -> set[str]:
        return set(self.pods)

    async def _certificate(self, body: Body, _fds: list[int]) -> tuple[Body, tuple[int, ...]]:
        identity = await self.certs.identity(SpiffeId.parse(str(body["identity"])))
        return {
            "chain": identity.cert_chain_pem.decode(),
            "key": identity.key_pem.decode(),
            "root": identity.root_pem.decode(),
        }, ()

    # the node's views (called from the HTTP threads through `on_loop`) ----------------
    def on_loop(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _ask_all(self, kind: str, timeout: float) -> list[tuple[_Worker, Body | None]]:
        workers = self.live()
        replies = await asyncio.gather(
            *(w.link.call(kind, timeout=timeout) for w in workers), return_exceptions=True
        )
        return [
            (w, None if isinstance(r, BaseException) else r[0])
            for w, r in zip(workers, replies, strict=True)
        ]

    async def ready(self) -> bool:
        """Synced with the agent, all workers up, each with its config and every pod."""
        if not self.inpod.synced.is_set() or len(self.live()) < self.expected:
            return False
        statuses = await self._ask_all("status", STATUS_TIMEOUT)
        return all(
            status is not None and status["ready"] and set(self.pods) <= w.pods
            for w, status in statuses
        )

    def ready_now(self) -> bool:
        """`ready` for the readiness thread; a loop too busy to answer is not ready."""
        try:
            return self.on_loop(self.ready(), STATUS_TIMEOUT + 1)
        except TimeoutError:
            return False

    async def scrape(self) -> Totals:
        for worker, reply in await self._ask_all("metrics", SCRAPE_TIMEOUT):
            if reply is not None:
                worker.families = reply["families"]
        totals = self.retired.copy()
        for worker in self.live():  # one that died meanwhile is in `retired` already
            totals.add(worker.families)
        return totals

    async def config_dump(self) -> dict[str, object]:
        statuses = await self._ask_all("status", STATUS_TIMEOUT)
        view: dict[str, object] = {}
        if self.live():
            with contextlib.suppress(Exception):
                view, _ = await self.live()[0].link.call("state", timeout=STATUS_TIMEOUT)
        return {
            **view,
            "local_pods": [
                {
                    "uid": uid,
                    "pod": f"{p.info.namespace}/{p.info.name}",
                    "identity": p.identity.uri,
                    "addresses": list(p.info.addresses),
                    "hbone_serving": bool(statuses)
                    and all(s is not None and s["serving"].get(uid) for _, s in statuses),
                }
                for uid, p in self.pods.items()
            ],
            "certificates": {s.identity.uri: s.not_after.isoformat() for s in self.certs.status()},
            "workers": [
                {"index": w.index, "pid": w.pid, **(s or {"ready": False})} for w, s in statuses
            ],
        }

    async def connections(self) -> list[dict[str, object]]:
        return [
            {**conn, "worker": w.index}
            for w, reply in await self._ask_all("connections", SCRAPE_TIMEOUT)
            if reply is not None
            for conn in reply["connections"]
        ]

    async def workers_gone(self, deadline: float) -> None:
        """Wait (bounded) until every worker has drained and exited."""
        end = self._loop.time() + deadline
        while self.workers and self._loop.time() < end:
            await asyncio.sleep(0.2)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for worker in self.workers:
            worker.link.close()
        for pod in self.pods.values():
            pod.netns.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    future: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await future
    finally:
        loop.remove_reader(sock.fileno())


async def supervise(args: argparse.Namespace, master: socket.socket, master_pid: int) -> None:
    access = ControllerAccess.from_args(args)
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    certs = NodeCertificates(lambda sid: access.fetch_identity(sid, args.cert_ttl))
    sup = Supervisor(args, certs)
    registry.register(CertCollector(certs))
    registry.register(WorkersCollector(lambda: sup.on_loop(sup.scrape(), SCRAPE_TIMEOUT + 1)))
    http_servers = [
        serve_in_thread(("0.0.0.0", args.metrics_port), metrics_routes(registry)),
        serve_in_thread(
            ("0.0.0.0", args.readiness_port),
            readiness_routes(sup.ready_now, master_pid),
        ),
        serve_in_thread(
            ("127.0.0.1", args.admin_port),
            admin_routes_of(
                lambda: sup.on_loop(sup.config_dump(), STATUS_TIMEOUT * 2 + 1),
                lambda: sup.on_loop(sup.connections(), SCRAPE_TIMEOUT + 1),
            ),
        ),
    ]
    stop, _ = drain_signals()
    master_task = asyncio.create_task(sup.follow_master(master))
    inpod_task = asyncio.create_task(sup.inpod.run())
    stop_task = asyncio.create_task(stop.wait())
    log.info(
        "ztunnel supervisor for %s up (pid %d, master %d, %d workers): metrics :%d, readiness :%d",
        args.node,
        os.getpid(),
        master_pid,
        args.workers,
        args.metrics_port,
        args.readiness_port,
    )
    try:
        await asyncio.wait({master_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        inpod_task.cancel()
        if not stop.is_set():  # the master died: a crash, as in the master's mirror case
            log.error("the master is gone: ending the workers")
            for worker in sup.live():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
        await asyncio.gather(*(asyncio.to_thread(stop_serving, s) for s in http_servers))
        # The workers drain on their own signal (or once this process is gone); until
        # then they may still need certificate renewals.
        await sup.workers_gone(args.drain_seconds + DRAIN_MARGIN_SECONDS)
    finally:
        for task in (master_task, inpod_task, stop_task):
            task.cancel()
        sup.close()
        master.close()


# -- worker ---------------------------------------------------------------------------


class _WorkerService:
    """What a worker answers the supervisor."""

    def __init__(self, ztunnel: Ztunnel, registry: CollectorRegistry) -> None:
        self.ztunnel = ztunnel
        self.registry = registry

    def handlers(self) -> dict[str, Handler]:
        return {
            "add_pod": self.add_pod,
            "del_pod": self.del_pod,
            "status": self.status,
            "state": self.state,
            "metrics": self.metrics,
            "connections": self.connections,
        }

    async def add_pod(self, body: Body, fds: list[int]) -> tuple[Body, tuple[int, ...]]:
        if len(fds) != 1:
            raise ValueError(f"add_pod needs one netns fd, got {len(fds)}")
        info = node_pb2.PodInfo.FromString(base64.b64decode(str(body["pod"])))
        return {}, (await self.ztunnel.add_pod(info, fds[0]),)

    async def del_pod(self, body: Body, _fds: list[int]) -> tuple[Body, tuple[int, ...]]:
        await self.ztunnel.del_pod(str(body["uid"]))
        return {}, ()

    async def status(self, _body: Body, _fds: list[int]) -> tuple[Body, tuple[int, ...]]:
        return {
            "ready": self.ztunnel.ready,
            "config_version": self.ztunnel.ctx.state.version,
            "live_connections": self.ztunnel.live_connections,
            "serving": {uid: p.serving for uid, p in self.ztunnel.pods.items()},
        }, ()

    async def state(self, _body: Body, _fds: list[int]) -> tuple[Body, tuple[int, ...]]:
        return state_dump(self.ztunnel.ctx.state), ()

    async def metrics(self, _body: Body, _fds: list[int]) -> tuple[Body, tuple[int, ...]]:
        return {"families": families_of(self.registry)}, ()

    async def connections(self, _body: Body, _fds: list[int]) -> tuple[Body, tuple[int, ...]]:
        return {"connections": self.ztunnel.ctx.connections.live()}, ()


def _fetch_through(link: WorkerLink, loop: asyncio.AbstractEventLoop, sid: SpiffeId) -> TlsIdentity:
    """CertManager's (blocking, executor-thread) fetch: ask the supervisor."""
    call = link.call("certificate", {"identity": sid.uri}, timeout=CERT_TIMEOUT)
    body, _ = asyncio.run_coroutine_threadsafe(call, loop).result(CERT_TIMEOUT + 1)
    return TlsIdentity(body["chain"].encode(), body["key"].encode(), body["root"].encode())


async def work(args: argparse.Namespace, sock: socket.socket) -> None:
    """One worker: the single-process ztunnel's data path, fed by the supervisor."""
    access = ControllerAccess.from_args(args)
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    loop = asyncio.get_running_loop()
    handlers: dict[str, Handler] = {}
    link = WorkerLink(sock, handlers)
    certs = CertManager(partial(_fetch_through, link, loop))
    ztunnel = Ztunnel(
        ProxyContext(
            certs=certs,
            connections=ConnectionTable(TcpMetrics(registry)),
            trust_domain=args.trust_domain,
            fast_path=from_flags(args.same_node_fast_path, args.bpf_maps),
        )
    )
    handlers.update(_WorkerService(ztunnel, registry).handlers())
    push = start_push(access, ztunnel.update_state, certs)
    stop, cut = drain_signals()
    link_task = asyncio.create_task(link.run())
    stop_task = asyncio.create_task(stop.wait())
    try:
        # A signal, or the supervisor gone: no new pods or certificates will come.
        await asyncio.wait({link_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        await ztunnel.drain(args.drain_seconds, cut)
    finally:
        stop_task.cancel()
        push.stop(2.0)
        await ztunnel.close()
        link.close()
        await asyncio.gather(link_task, return_exceptions=True)
