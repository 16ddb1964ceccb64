"""Training jobs and the trainer: the asyncio shell around protocol.rounds."""
