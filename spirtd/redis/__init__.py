"""The Redis side: the managed redis-server, the SPIRT module that it loads, the
tensor format and the tensor store. Kept free of heavy imports: the gradient
function imports ``spirtd.redis.tensorfmt`` inside Lambda."""
