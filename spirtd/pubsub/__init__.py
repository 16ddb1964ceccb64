"""Topic pub/sub: the service around protocol.gossip, the store of message bodies,
and the slab pool those bodies land in."""
