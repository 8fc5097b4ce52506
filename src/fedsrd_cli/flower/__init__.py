"""FedSRD on Flower: live rounds over a SuperLink and SuperNodes, with the same files and math.

Install with `pip install 'fedsrd-cli[flower]'`; docs/flower.md explains when to use it and how a
Flower round maps onto the CLI's files. The modules:

    settings     ServerSettings (a run's config) and SiteSettings (a node's config); no flwr
    coordinator  the server's rounds on files: sampling, upload checks, aggregate, broadcast,
                 global-rN.safetensors, results.json; no flwr
    site         a client's rounds on files: train-local, sparsify, apply, eval; no flwr
    wire         artifacts as Flower records: the safetensors bytes, unchanged (imports flwr)
    strategy     FedSRDStrategy, a Flower Strategy that drives the coordinator over a Grid (flwr)
    apps         server_app and client_app, built from the run and node configs (flwr)

Only `wire`, `strategy` and `apps` import flwr, and nothing outside this package imports them,
so `fedsrd` itself never loads Flower. flower/ may import every folder but cli/.
"""

from __future__ import annotations

FLOWER_EXTRA = "pip install 'fedsrd-cli[flower]'"
