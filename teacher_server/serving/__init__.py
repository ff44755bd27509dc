"""The serving core both protocols call: validation, batching, the forward, metrics."""
