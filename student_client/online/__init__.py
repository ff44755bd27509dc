"""The online path: talk to a running teacher (client, gRPC / HTTP transports, retries) and stream
a dataset's batches through it (`SoftTargetLoader`, and `exporter` to write them to disk)."""
