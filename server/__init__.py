"""The gRPC service: inference on vLLM, feedback, adapter administration, metrics."""
