"""The control plane: the HTTP API on the data dir's unix socket and spirtctl."""
