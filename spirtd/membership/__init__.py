"""The membership service: the asyncio shell around protocol.membership."""
