"""Scale-out: the device mesh, sharding rules and multi-host start-up.

`mesh.py` builds the ('data', 'fsdp', 'context', 'tensor') mesh from config; `rules.py` holds the
logical-axis and parameter tables and `use_mesh` / `constrain`; `distributed.py` starts a
multi-host job. The context-parallel attention kernels (ring, Ulysses, splash) are backends of
`magi_jax.attention`; this package imports nothing from it.
"""
