"""The Open Inference Protocol (KServe v2, as spoken by Triton): `grpc_predict_v2.proto` and its
generated code, package `inference`, service `GRPCInferenceService`.

Its message names clash with the copy that ships in `tritonclient.grpc` (same `inference.*`
symbols in protobuf's default pool): a process should import one or the other, not both.
"""
