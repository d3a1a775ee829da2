"""Scale-out: the device mesh, sharding rules, context-parallel attention, multi-host start-up.

`mesh.py` builds the ('data', 'fsdp', 'context', 'tensor') mesh from config; `rules.py` holds the
logical-axis and parameter tables and `use_mesh` / `constrain`; `ring_attention.py` (with the
per-device arithmetic in `flash.py`), `ulysses.py` and `splash.py` are attention backends that
the one entry point (`magi_jax.attention.attention`) loads by name: 'ring', 'ulysses', 'splash'.
"""
