"""The Open Inference Protocol's gRPC service definition and its generated Python code."""
