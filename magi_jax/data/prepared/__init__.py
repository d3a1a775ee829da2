"""Offline-encoded training data: clips of a video folder as VAE latents per chunk and T5 rows
per distinct caption in array_record shards (`python -m experiments.prepare`), read by the
grain pipeline without the VAE or T5.

`layout` (the directory, shard plan, markers, manifest), `records` (one clip as bytes; the
`PreparedSource` of a finished directory), `job` (one process's shards).
"""
