"""The site's resident executor: runs every task of the SuperNode in one long-lived process.

In deployment Flower's SuperExec starts a fresh ``flwr-clientapp`` process for every message,
so a plain ClientApp reloads the base model (and re-reads the site's data) every round. ftclient
instead runs the SuperNode with ``--isolation process`` and serves its tasks itself, in this
process, where the model, tokenizer and tokenized data stay loaded between rounds
(:mod:`fedtune.client.app` caches them per process):

    loop: AcquireTask (SuperNode Runtime API, localhost) -> pull the message + context
          -> handle_train / handle_evaluate -> push the reply -> report the task done

What this executor runs is always fedtune's installed ClientApp: the FAB a coordinator
sends is never executed at the site, so a coordinator cannot make a site run its code.

The Runtime API calls are Flower's own (``flwr.supernode.runtime.run_clientapp`` pulls and
pushes the same way); only the process lifetime differs. flwr is pinned in pyproject.toml
because these are internal modules.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import httpx
from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    ObjectUnavailableError,
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

log = logging.getLogger("fedtune.client")

Handler = Callable[[Message, object, float, float], Message]  # (message, context, arrived, received) -> reply


def _client(address: str, interceptors: list, retry: bool = True) -> RuntimeHttpClient:
    invoker = make_simple_http_retry_invoker()
    if not retry:
        invoker.max_tries = 1  # the poll loop is the retry; a backoff here would hide a dead SuperNode
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the SuperNode's Runtime API listens on 127.0.0.1 only
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=invoker,
    )


def pull_task_input(client: RuntimeHttpClient, watch: Callable | None = None) -> tuple[Message, object]:
    """Flower's ``run_clientapp.pull_task_input`` with a short retry for objects the SuperNode is
    still fetching: Flower's default first backoff is 1 s (doubling to 10 s), which alone would
    add seconds to every round; locally a 20 ms start (capped at 0.25 s) costs nothing.
    ``watch`` wraps the object-pull function (see :meth:`ResidentExecutor._watch`)."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context = context_from_proto(res.context)
    run_from_proto(res.run)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed out a task without a message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    pull = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)
    message = pull_and_inflate_object_from_tree(
        tree,
        watch(pull) if watch is not None else pull,
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=0.02,
        backoff_cap=0.25,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: the deflated message lacks its own id
    return message, context


class ResidentExecutor:
    """Polls the local SuperNode for ClientApp tasks and runs each with ``handler`` in this process."""

    def __init__(self, runtime_address: str, handler: Handler, secret: bytes | None = None, poll_s: float = 0.1):
        self.address = runtime_address
        self.handler = handler
        self.poll_s = poll_s
        self.stop_event = threading.Event()
        interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if secret:
            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})
                )
            )
        self.acquirer = _client(runtime_address, interceptors, retry=False)
        self.tasks_done = 0
        self.superseded_by: str | None = None  # a newer task's token, taken while the current one stalled

    def acquire(self) -> str | None:
        """-> a task token, or None when there is no ClientApp task waiting."""
        try:
            res = self.acquirer.AcquireTask(
                AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])
            )
        except httpx.HTTPError:
            return None  # SuperNode not up yet, or going away
        return res.token if res.HasField("task") and res.token else None

    def _watch(self, pull: Callable[[str], bytes], check_every_s: float = 2.0) -> Callable[[str], bytes]:
        """Wrap an object pull: while the message's objects are not there yet, look every few
        seconds for a newer task. The SuperNode fetches one message at a time, so a newer task
        means it gave up on this one (say the coordinator restarted mid-transfer); without this
        the executor would wait for those objects for Flower's two-hour pull limit."""
        lock = threading.Lock()
        next_check = [time.monotonic() + check_every_s]

        def watched(object_id: str) -> bytes:
            if self.superseded_by is not None:
                raise ObjectPullError(object_id, "superseded by a newer task")
            try:
                return pull(object_id)
            except ObjectUnavailableError:
                with lock:
                    if self.superseded_by is None and time.monotonic() >= next_check[0]:
                        next_check[0] = time.monotonic() + check_every_s
                        self.superseded_by = self.acquire()
                if self.superseded_by is not None:
                    raise ObjectPullError(object_id, "the SuperNode abandoned this task for a newer one") from None
                raise

        return watched

    def run_task(self, token: str, arrived: float) -> None:
        client = _client(
            self.address,
            [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
        )
        cancelled = threading.Event()

        def heartbeat() -> bool:
            try:
                res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
            except httpx.HTTPError:
                return False
            if not res.success:
                cancelled.set()  # the run was stopped; Flower's own sender would SIGINT the process
            return True

        beat = HeartbeatSender(heartbeat)
        beat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context = pull_task_input(client, self._watch)
            reply = self.handler(message, context, arrived, time.time())
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - any failure becomes an error reply, the executor lives on
            if self.superseded_by is None:
                log.exception("task failed")
            details = f"{type(ex).__name__}: {ex}"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None and not cancelled.is_set():
                    push_message(client, reply, context)
            except Exception:  # noqa: BLE001
                log.exception("could not send the reply")
            finally:
                push_task_output(client=client, context=context, sub_status=status, details=details)
                beat.stop()
                client.close()
        self.tasks_done += 1

    def serve(self) -> None:
        while not self.stop_event.is_set():
            token, self.superseded_by = self.superseded_by or self.acquire(), None
            if token is None:
                self.stop_event.wait(self.poll_s)
                continue
            self.run_task(token, time.time())

    def stop(self) -> None:
        self.stop_event.set()
