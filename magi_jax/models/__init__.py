from magi_jax.models.dit import DiTOutput, InputError, VideoDiT
from magi_jax.models.kv_cache import CacheError, KVCache, KVCacheStore
from magi_jax.models.precision import Precision

__all__ = ["CacheError", "DiTOutput", "InputError", "KVCache", "KVCacheStore", "Precision",
           "VideoDiT"]
