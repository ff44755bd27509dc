"""Our own protocol, `distill.v1`: its gRPC service, its HTTP routes and their conversions."""
