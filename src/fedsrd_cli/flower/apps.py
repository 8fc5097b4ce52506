"""The ServerApp and the ClientApp of fedsrd on Flower.

`server_app` reads the run config (`[tool.flwr.app.config]`, `flwr run --run-config`) into
`ServerSettings` and runs `FedSRDStrategy`; `client_app` reads each SuperNode's node config
(`flower-supernode --node-config`) into `SiteSettings` and answers the coordinator's messages with
a `Site`. A Flower App points its components at them (examples/flower does):

    [tool.flwr.app.components]
    serverapp = "fedsrd_flower.server_app:app"     # app = fedsrd_cli.flower.apps.server_app
    clientapp = "fedsrd_flower.client_app:app"     # app = fedsrd_cli.flower.apps.client_app

A fedsrd error on a client (a refused state or broadcast, a bad data file) is answered with a
Flower Error whose reason is the one-line message and whose code is the CLI's exit code; the
coordinator reports it and goes on with the other clients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from logging import WARNING

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedsrd_cli.errors import FedsrdError
from fedsrd_cli.files.artifacts import Artifact
from fedsrd_cli.flower import wire
from fedsrd_cli.flower.coordinator import Coordinator
from fedsrd_cli.flower.settings import ServerSettings, SiteSettings
from fedsrd_cli.flower.site import Site
from fedsrd_cli.flower.strategy import FedSRDStrategy

server_app = ServerApp()
client_app = ClientApp()

_SITES: dict[SiteSettings, Site] = {}


def _report(line: str) -> None:
    log(WARNING, "%s", line)


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    settings = ServerSettings.from_run_config(context.run_config)
    FedSRDStrategy(Coordinator(settings, report=_report)).start(grid)


def site_for(context: Context) -> Site:
    """The node's Site, built once per process from its node config (the base model loads once)."""
    settings = SiteSettings.from_node_config(context.node_config)
    if settings not in _SITES:
        _SITES[settings] = Site(settings)
    return _SITES[settings]


Handler = Callable[[Message, Context], Message]


def _answers_errors(handler: Handler) -> Handler:
    """A FedsrdError becomes an error reply (one line, the CLI's exit code), not a crash."""

    @functools.wraps(handler)
    def wrapper(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except FedsrdError as err:
            return Message(Error(code=err.exit_code, reason=str(err)), reply_to=message)

    return wrapper


@client_app.query("fedsrd_state")
@_answers_errors
def _query_state(message: Message, context: Context) -> Message:
    """Who this node is, and whether it holds the coordinator's current global state."""
    site = site_for(context)
    question = wire.config_of(message.content)
    holds = site.holds(int(question["round"]), str(question["state-hash"]))
    return Message(wire.content(config={"client-id": site.client_id, "holds": holds}), reply_to=message)


def _evaluation_reply(site: Site, state: Artifact, config: dict, message: Message) -> Message:
    """Evaluate `state` on the site's eval data and answer `message` with its loss and hash."""
    loss = site.evaluate(state, int(config.get("max-length", 512)))
    answer = {"client-id": site.client_id, "state-hash": state.header.content_hash}
    return Message(
        wire.content(config=answer, metrics={"eval-loss": loss} if loss is not None else None),
        reply_to=message,
    )


@client_app.evaluate()
@_answers_errors
def _evaluate(message: Message, context: Context) -> Message:
    """Evaluate the coordinator's state (saved first when the message carries it)."""
    site = site_for(context)
    question = wire.config_of(message.content)
    state = site.state(
        int(question["round"]),
        str(question["state-hash"]),
        wire.artifact_bytes(message.content, wire.STATE),
    )
    return _evaluation_reply(site, state, question, message)


@client_app.train()
@_answers_errors
def _train(message: Message, context: Context) -> Message:
    """`train-local` and `sparsify` from the current state; the reply carries the upload file."""
    site = site_for(context)
    instructions = wire.config_of(message.content)
    round_index = int(instructions["round"])
    state = site.state(
        round_index - 1,
        str(instructions["state-hash"]),
        wire.artifact_bytes(message.content, wire.STATE),
    )
    result = site.train(state, instructions)
    metrics = {"train-loss": result.train_loss, "num-samples": result.num_samples, "seconds": result.seconds}
    return Message(
        wire.content(config={"client-id": site.client_id}, metrics=metrics, upload=result.upload),
        reply_to=message,
    )


@client_app.train("fedsrd_remask")
@_answers_errors
def _remask(message: Message, context: Context) -> Message:
    """A secure round's re-issued roster: mask this round's local state again; the reply carries the
    new masked upload."""
    site = site_for(context)
    instructions = wire.config_of(message.content)
    round_index = int(instructions["round"])
    state = site.state(round_index - 1, str(instructions["state-hash"]), None)
    upload = site.mask(state, round_index, str(instructions["roster"]))
    return Message(wire.content(config={"client-id": site.client_id}, upload=upload), reply_to=message)


@client_app.train("fedsrd_apply")
@_answers_errors
def _apply(message: Message, context: Context) -> Message:
    """`apply` the broadcast (or take the new state when the message carries it), then evaluate."""
    site = site_for(context)
    instructions = wire.config_of(message.content)
    round_index = int(instructions["round"])
    broadcast = wire.artifact_bytes(message.content, wire.BROADCAST)
    if broadcast is not None:
        parent = site.state(round_index - 1, str(instructions["parent-hash"]))
        state = site.apply(parent, broadcast)
    else:
        state = site.state(
            round_index,
            str(instructions["result-hash"]),
            wire.artifact_bytes(message.content, wire.STATE),
        )
    return _evaluation_reply(site, state, instructions, message)
