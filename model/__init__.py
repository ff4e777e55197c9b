"""nsam.model: the NSAM language model — backbone, memory levels, generation. Pure PyTorch, no I/O
beyond reading model files; no gRPC, Redis, metrics or environment variables."""
