"""The file format and everything that reads or writes it.

    artifacts       Artifact, read_artifact, write_artifact: the files every command exchanges
    header          Header: the fedsrd metadata of a file and the rules it obeys on its own
    layout          the tensor names, shapes and dtypes each kind of file requires
    safetensors_io  the bytes: canonical encoding, content hash, checked low-level reading
    atomic          crash-safe writing (temporary file, fsync, rename; never overwrite by accident)
    adapters        local adapters: fedsrd local states and PEFT adapter folders
    naming          tensor key names inside the files
    model_spec      a base model's LoRA targets, shapes and fingerprint; the round-0 state
    export          a global state as a PEFT adapter folder
    describe        what `inspect` reports about a file

May import math/, privacy/ (the ledger a header carries) and the small modules at the top;
never trust/, site/, algorithms/ or anything above them.
"""
