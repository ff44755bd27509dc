"""The Open Inference Protocol (KServe v2 / Triton): its gRPC service, HTTP routes and conversions."""
