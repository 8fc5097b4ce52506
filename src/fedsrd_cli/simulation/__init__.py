"""`simulate`: whole federated runs in one process, with the same algorithms as the CLI.

    rounds       the run's configuration, the round loop and its report

May import suites/, site/, algorithms/ and everything below; cli/ and flower/ import it,
never the other way round.
"""
