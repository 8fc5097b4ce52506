"""FedSRDStrategy: a Flower Strategy that runs fedsrd rounds through the `Coordinator`.

A round, as messages (docs/flower.md has the full table):

1. `query.fedsrd_state` to every node seen for the first time: which client are you, do you hold
   the current state? (Later, the replies below tell what each node holds.)
2. `train` to the sampled clients: the flags of `train-local` and `sparsify`, plus the global
   state file for a node that does not hold it; the reply carries the upload file.
3. the coordinator checks each upload (a refused one is reported, the round goes on), then
   aggregates and broadcasts (`aggregate_train`).
   In a secure round (`secure`), the train instruction carries the signed roster and the
   uploads are masked; when a roster site sends nothing, `train.fedsrd_remask` gives the sites
   that did a re-issued roster, and they mask their same local state again.
4. `train.fedsrd_apply` to every node: the broadcast file (or, for a node that missed the
   previous state, the new global state file); each node applies it, checks the result hash,
   evaluates, and answers with the hash it holds and its eval loss (`aggregate_evaluate`).

The Strategy hooks (`configure_train`, `aggregate_train`, `configure_evaluate`,
`aggregate_evaluate`) do exactly those steps; `start` runs them from the coordinator's current
round (a restarted server resumes) to its last, and evaluates the initial state first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedsrd_cli.flower import wire
from fedsrd_cli.flower.coordinator import Coordinator

POLL_SECONDS = 1.0


class FedSRDStrategy(Strategy):
    """Runs the coordinator's rounds over a Grid: every method of fedsrd_cli.algorithms, as files."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        settings = coordinator.settings
        self.timeout = settings.round_timeout
        self.connect_timeout = settings.connect_timeout
        self.min_clients = settings.min_clients or len(settings.client_list) or 1
        self.clients: dict[int, str] = {}  # node id -> client id, from the last query
        self.holds: dict[int, bool] = {}  # node id -> holds the current global state
        self.left_out: set[int] = set()  # nodes that did not answer who they are, or not as expected

    # ------------------------------------------------------------------ Strategy

    def summary(self) -> None:
        settings = self.coordinator.settings
        log(
            INFO,
            "\t├── fedsrd method: %s, rounds up to %s, seed %s",
            settings.method,
            settings.rounds,
            settings.seed,
        )
        log(
            INFO,
            "\t├── clients: %s, %s per round",
            settings.clients or "those connected",
            settings.sample_clients or "all",
        )
        log(INFO, "\t└── files: %s (trust %s)", settings.out, settings.trust or "none")

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run (or resume) the coordinator's rounds up to its settings' `rounds`.

        The global state comes from the coordinator (its `initial-state`, `base`, or the last
        state of a resumed run), not from `initial_arrays`; `num_rounds` and `timeout`, when
        given, override the settings' `rounds` and `round-timeout`.
        """
        coordinator = self.coordinator
        if timeout is not None:
            self.timeout = timeout
        log(INFO, "Starting FedSRDStrategy:")
        self.summary()
        coordinator.start()
        last = num_rounds if num_rounds is not None else coordinator.settings.rounds
        result = Result()
        if not coordinator.records:
            self._discover(grid)
            replies = self._exchange(grid, self._initial_evaluate_messages(grid))
            record = coordinator.record_initial(self._eval_losses(replies))
            log(
                INFO,
                "Initial state %s: mean eval loss %s",
                record["global_hash"][:19],
                record["mean_eval_loss"],
            )
        while coordinator.round < last:
            round_index = coordinator.round + 1
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", round_index, last)
            replies = self._exchange(
                grid, self.configure_train(round_index, ArrayRecord(), ConfigRecord(), grid)
            )
            if coordinator.settings.secure:  # mask again for a new roster until every site delivered
                self._receive(replies, coordinator.current.sampled)  # type: ignore[union-attr]
                broadcast, train_metrics = self._remask_and_finish(grid, round_index)
            else:
                broadcast, train_metrics = self.aggregate_train(round_index, replies)
            if broadcast is None:
                break
            if train_metrics is not None:
                result.train_metrics_clientapp[round_index] = train_metrics
            replies = self._exchange(
                grid, self.configure_evaluate(round_index, broadcast, ConfigRecord(), grid)
            )
            eval_metrics = self.aggregate_evaluate(round_index, replies)
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[round_index] = eval_metrics
            result.arrays = broadcast
        log(INFO, "FedSRD run finished at round %s: %s", coordinator.round, coordinator.state_path)
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Find the connected clients, sample the round's, and send each its train instruction."""
        coordinator = self.coordinator
        self._discover(grid)
        round_state = coordinator.begin_round(sorted(self.clients.values()))
        log(INFO, "configure_train: sampled %s", ", ".join(round_state.sampled))
        messages = []
        for node, client in sorted(self.clients.items()):
            if client not in round_state.sampled:
                continue
            state = None
            if not self.holds.get(node):
                state = coordinator.state_bytes()
                coordinator.sent_state(len(state))
            body = wire.content(config=coordinator.train_instructions(client), state=state)
            messages.append(self._message(grid, body, node, wire.TRAIN, server_round))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand every upload to the coordinator (refusals are reported), then aggregate and broadcast."""
        round_state = self.coordinator.current
        assert round_state is not None
        self._receive(replies, round_state.sampled)
        return self._finish()

    def _remask_and_finish(
        self, grid: Grid, server_round: int
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """A secure round: while a roster site did not deliver, sign a roster of those that did and
        let them mask again (one more message each); then aggregate. The attempts are bounded by
        the sites (each one drops at least one)."""
        coordinator = self.coordinator
        while coordinator.missing_from_roster():
            sites = coordinator.reissue_roster()
            instructions = coordinator.remask_instructions()
            nodes = {client: node for node, client in self.clients.items()}
            messages = [
                self._message(grid, wire.content(config=instructions), nodes[site], wire.REMASK, server_round)
                for site in sites
                if site in nodes
            ]
            self._receive(self._exchange(grid, messages), sites)
        return self._finish()

    def _receive(self, replies: Iterable[Message], expected: Iterable[str]) -> None:
        """Hand every upload to the coordinator; a client of `expected` that sent none failed."""
        coordinator = self.coordinator
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            client = self.clients.get(node, f"node {node}")
            answered.add(client)
            if reply.has_error():
                coordinator.failed(client, f"error on the client: {_reason(reply)}")
                self.holds[node] = False  # perhaps it lost its state: send it next time
                continue
            try:
                data = wire.artifact_bytes(reply.content, wire.UPLOAD)
            except Exception as err:  # a malformed reply: that client's problem, not the round's
                coordinator.failed(client, str(err))
                continue
            if data is None:
                coordinator.failed(client, "the reply carries no upload")
                continue
            metrics = wire.metrics_of(reply.content)
            loss = metrics.get("train-loss")
            coordinator.receive_upload(client, data, float(loss) if loss is not None else None)
        for client in expected:
            if client not in answered and client in self.clients.values():
                coordinator.failed(client, f"no reply within {self.timeout:g} s")

    def _finish(self) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate and broadcast the accepted uploads; every node that trained holds the state."""
        coordinator = self.coordinator
        round_state = coordinator.current
        assert round_state is not None
        broadcast = coordinator.finish_round()
        for node, client in self.clients.items():
            # a client whose upload was accepted trained from the current state, so it holds it
            if client in round_state.accepted:
                self.holds[node] = True
        metrics = MetricRecord(
            {
                "accepted": len(round_state.accepted),
                "refused": len(round_state.refused),
                "failed": len(round_state.failed),
                "upload-bytes": sum(round_state.upload_bytes.values()),
                "broadcast-bytes": len(broadcast),
            }
        )
        log(
            INFO,
            "aggregate_train: %s uploads aggregated (%s refused, %s failed), broadcast of %s bytes",
            len(round_state.accepted),
            len(round_state.refused),
            len(round_state.failed),
            len(broadcast),
        )
        return wire.artifact_record(broadcast), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the broadcast to every node (the new state to one that lacks the previous state)."""
        coordinator = self.coordinator
        round_state = coordinator.current
        assert round_state is not None and round_state.broadcast_path is not None
        broadcast = round_state.broadcast_path.read_bytes()
        instructions = {
            "round": server_round,
            "parent-hash": coordinator.state.header.content_hash,  # type: ignore[union-attr]
            "result-hash": round_state.next_hash,
            "max-length": coordinator.settings.max_length,
        }
        messages = []
        for node in sorted(self.clients):
            if self.holds.get(node):
                body = wire.content(config=instructions, broadcast=broadcast)
            else:
                state = (coordinator.out / f"global-r{server_round}.safetensors").read_bytes()
                coordinator.sent_state(len(state))
                body = wire.content(config=instructions, state=state)
            messages.append(self._message(grid, body, node, wire.APPLY, server_round))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record the round: which clients hold the new state, and their eval losses."""
        coordinator = self.coordinator
        round_state = coordinator.current
        assert round_state is not None
        applied, losses = self._applied(replies, round_state.next_hash)
        record = coordinator.record_round(applied, losses)
        log(
            INFO,
            "aggregate_evaluate: round %s state %s held by %s/%s nodes, mean eval loss %s",
            server_round,
            record["global_hash"][:19],
            len(record["extra"]["applied"]),
            len(self.clients),
            record["mean_eval_loss"],
        )
        metrics: dict[str, Any] = {"download-bytes": record["download_bytes"], "nodes": len(applied)}
        if record["mean_eval_loss"] is not None:
            metrics["mean-eval-loss"] = record["mean_eval_loss"]
        return MetricRecord(metrics)

    # ------------------------------------------------------------------ helpers

    def _discover(self, grid: Grid) -> None:
        """Wait for min_clients nodes; ask each node seen for the first time who it is and whether it
        holds the current state. Later rounds learn what a node holds from its replies."""
        coordinator = self.coordinator
        deadline = time.monotonic() + self.connect_timeout
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < self.min_clients and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            nodes = sorted(grid.get_node_ids())
        if not nodes:
            from fedsrd_cli.errors import UsageError

            raise UsageError(f"no SuperNode connected within {self.connect_timeout:g} s")
        if len(nodes) < self.min_clients:
            log(WARNING, "only %s of %s expected nodes connected; going on", len(nodes), self.min_clients)
        for node in sorted(set(self.clients) - set(nodes)):
            log(INFO, "client %r (node %s) is no longer connected", self.clients.pop(node), node)
            self.holds.pop(node, None)
        new = [n for n in nodes if n not in self.clients and n not in self.left_out]
        if not new:
            return
        state = coordinator.state
        assert state is not None
        question = {"round": state.header.round, "state-hash": state.header.content_hash}
        messages = [
            self._message(grid, wire.content(config=question), node, wire.QUERY_STATE, state.header.round)
            for node in new
        ]
        listed = coordinator.settings.client_list
        for reply in self._exchange(grid, messages, timeout=min(self.timeout, 300.0)):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %s did not say who it is, left out: %s", node, _reason(reply))
                self.left_out.add(node)
                continue
            answer = wire.config_of(reply.content)
            client = str(answer.get("client-id", ""))
            if client in self.clients.values():
                log(WARNING, "node %s also claims to be client %r, left out", node, client)
                self.left_out.add(node)
            elif listed and client not in listed:
                log(WARNING, "node %s is client %r, not in the run's 'clients', left out", node, client)
                self.left_out.add(node)
            else:
                self.clients[node] = client
                self.holds[node] = bool(answer.get("holds", False))

    def _initial_evaluate_messages(self, grid: Grid) -> list[Message]:
        coordinator = self.coordinator
        state = coordinator.state
        assert state is not None
        question = {
            "round": state.header.round,
            "state-hash": state.header.content_hash,
            "max-length": coordinator.settings.max_length,
        }
        messages = []
        for node in sorted(self.clients):
            data = None if self.holds.get(node) else coordinator.state_bytes()
            messages.append(
                self._message(
                    grid, wire.content(config=question, state=data), node, wire.EVALUATE, state.header.round
                )
            )
        return messages

    def _eval_losses(self, replies: Iterable[Message]) -> dict[str, float]:
        state = self.coordinator.state
        assert state is not None
        _, losses = self._applied(replies, state.header.content_hash)
        return losses

    def _applied(self, replies: Iterable[Message], expected: str) -> tuple[dict[str, str], dict[str, float]]:
        """({client: the state hash it now holds}, {client: its eval loss}) from apply/evaluate replies."""
        applied: dict[str, str] = {}
        losses: dict[str, float] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            client = self.clients.get(node, f"node {node}")
            if reply.has_error():
                log(WARNING, "client %r could not take the new state: %s", client, _reason(reply))
                self.holds[node] = False
                continue
            answer = wire.config_of(reply.content)
            applied[client] = str(answer.get("state-hash", ""))
            self.holds[node] = applied[client] == expected
            loss = wire.metrics_of(reply.content).get("eval-loss")
            if loss is not None:
                losses[client] = float(loss)
        return applied, losses

    def _exchange(
        self, grid: Grid, messages: Iterable[Message], timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        return list(grid.send_and_receive(messages, timeout=timeout or self.timeout))

    @staticmethod
    def _message(grid: Grid, body: Any, node: int, message_type: str, round_index: int) -> Message:
        return Message(content=body, dst_node_id=node, message_type=message_type, group_id=str(round_index))


def _reason(reply: Message) -> str:
    reason = reply.error.reason or f"error code {reply.error.code}"
    return reason.strip().splitlines()[-1] if reason.strip() else reason
