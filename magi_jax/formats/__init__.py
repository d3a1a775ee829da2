"""Checkpoint file formats, independent of any model: safetensors (read by mmap, written
sharded), PyTorch's zip `.bin` (read without torch) and checkpoint directories (single file,
index + shards, optional `.zst`)."""
