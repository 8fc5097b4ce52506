"""Secure rounds on Llama-3.2-3B shapes: what masking costs a site and summing costs the coordinator.

    python benchmarks/secure.py [--layers 1] [--sites 4 64] [--secure-density 1] [--word-bits 32]
                                [--update-spread] [--workdir DIR]

Shapes and synthetic states as benchmarks/coordinator.py (r = 64 on the 7 linear modules of
each decoder layer). For each number of sites n it builds n local states, then measures, in this
run and on the same files:

1. a site's masked upload (algorithms.secure.masked_upload: its projection, fixed point and
   n - 1 pairwise masks, at the roster's public positions and word width), seconds and bytes,
   against its plain FedSRD upload (Method.upload); with --update-spread the rosters ask every
   site for its masked squared update norm too (FedExP's step in secure rounds);
2. the coordinator's secure aggregate (algorithms.secure.secure_aggregate: read the n masked
   uploads, sum modulo 2^32, decode, lift) against the plain FedSRD-e aggregate of the n plain
   uploads (Method.aggregate), seconds and the ratio.

Figures are for `--layers` decoder layers; times and bytes scale linearly with the layers (the
28-layer model is 28 times one layer), which the output states.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from benchmarks.coordinator import build_global, build_local  # noqa: E402
from fedsrd_cli.algorithms import get_algorithm  # noqa: E402
from fedsrd_cli.algorithms.secure import masked_upload, secure_aggregate  # noqa: E402
from fedsrd_cli.config import AggregateConfig, SparsifyConfig  # noqa: E402
from fedsrd_cli.files.adapters import read_local  # noqa: E402
from fedsrd_cli.files.artifacts import read_artifact, write_artifact  # noqa: E402
from fedsrd_cli.trust.agreement import AgreementKey  # noqa: E402
from fedsrd_cli.trust.roster import make_roster  # noqa: E402

MB = 2**20


def timed(action, *args):
    start = time.perf_counter()
    result = action(*args)
    return time.perf_counter() - start, result


def main() -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--sites", type=int, nargs="+", default=[4, 64])
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--secure-density", type=float, default=1.0)
    parser.add_argument("--word-bits", type=int, default=32)
    parser.add_argument("--update-spread", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="fedsrd-secure-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    global_path = root / "global.safetensors"
    build_global(global_path, args.layers)
    state = read_artifact(global_path)
    fedsrd, fedsrd_e = get_algorithm("fedsrd"), get_algorithm("fedsrd-e")
    print(f"Llama-3.2-3B shapes, {args.layers} decoder layer(s), r = 64 (28 layers: x{28 / args.layers:g})")
    spread = ", every site's squared update norm" if args.update_spread else ""
    print(f"rosters: density {args.secure_density:g}, {args.word_bits}-bit words{spread}")
    for n in args.sites:
        folder = root / f"sites-{n}"
        folder.mkdir(exist_ok=True)
        names = [f"site-{i:03d}" for i in range(n)]
        keys = {name: AgreementKey(name, X25519PrivateKey.generate()) for name in names}
        published = {name: key.public for name, key in keys.items()}
        roster = make_roster(
            state.header.content_hash, state.header.round + 1, names, 1, args.clip,
            args.secure_density, args.word_bits, args.update_spread,
        )  # fmt: skip
        masked_paths, plain_paths, mask_seconds, plain_seconds = [], [], [], []
        for i, name in enumerate(names):
            local_path = folder / f"local-{name}.safetensors"
            if not local_path.exists():
                build_local(global_path, local_path, seed=i + 1)
            local = read_local(local_path)
            seconds, (payload, _left) = timed(
                masked_upload, state, local, name, 1, roster, keys[name], published
            )
            mask_seconds.append(seconds)
            masked_paths.append(folder / f"masked-{name}.safetensors")
            write_artifact(masked_paths[-1], payload.header, payload.tensors, force=True)
            seconds, payload = timed(fedsrd.upload, state, local, name, 1, SparsifyConfig())
            plain_seconds.append(seconds)
            plain_paths.append(folder / f"plain-{name}.safetensors")
            write_artifact(plain_paths[-1], payload.header, payload.tensors, force=True)
        masked = [read_artifact(p) for p in masked_paths]
        plain = [read_artifact(p) for p in plain_paths]
        config = AggregateConfig("fedsrd-e", update_spread=args.update_spread)
        secure_s, _ = timed(secure_aggregate, state, masked, roster, config)
        plain_s, _ = timed(fedsrd_e.aggregate, state, plain, AggregateConfig("fedsrd-e"))
        masked_mb = statistics.fmean(p.stat().st_size for p in masked_paths) / MB
        plain_mb = statistics.fmean(p.stat().st_size for p in plain_paths) / MB
        print(f"  {n} sites:")
        print(
            f"    site: masked upload {statistics.median(mask_seconds):.2f} s, {masked_mb:.2f} MB;"
            f" plain FedSRD upload {statistics.median(plain_seconds):.2f} s, {plain_mb:.2f} MB"
            f" (masked / plain bytes {masked_mb / plain_mb:.2f}x)"
        )
        print(
            f"    coordinator: secure sum {secure_s:.2f} s; plain FedSRD-e aggregate {plain_s:.2f} s"
            f" (secure / plain {secure_s / plain_s:.2f}x)"
        )
    print(f"files in {root}")


if __name__ == "__main__":
    main()
