"""Encrypted links to peers: the transport that dials and accepts, each link, its
record reader and its bounded send queue."""
