"""Everything that mirrors the official PyTorch release of MAGI-1 (SandAI-org/MAGI-1): its
checkpoint layouts for the DiT, the VAE and T5 (`dit_layout`, `vae_layout`, `t5_layout`), strict
loading and export (`strict`, `dit`, `vae`, `t5`) and the parity checks against its fixtures
(`python -m magi_jax.official.parity`). The library's core imports nothing from here.
"""
