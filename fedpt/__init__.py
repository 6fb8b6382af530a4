"""fedpt: federated generative pretraining (the `fedpt` command lives in fedpt.cli)."""

import os

# grpc's C core logs a failed TLS handshake (and more) to stderr at INFO level, around the one
# `fedpt: error:` line a refused node prints. Errors only, unless the operator sets it; this
# runs before anything imports grpc, which reads the variable once.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
