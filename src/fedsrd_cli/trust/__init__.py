"""Who wrote a file, and who may read it: identities and secrecy.

    signing      Ed25519 keys, signed files, trust folders (`keygen`, `sign`, `--trust`)
    agreement    X25519 agreement keys (secure aggregation's pairwise masks, sealed files)
    roster       the coordinator's signed list of a secure round's sites
    sealed       files encrypted for one party (`seal`, `open`, `--encrypt-to`)

Uses `cryptography` for every primitive (imported inside the functions that need it). May
import files/ and math/; never privacy/, algorithms/, site/ or anything above.
"""
