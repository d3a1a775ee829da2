"""Fine-tuning utilities for the MAGI-1 DiT."""
