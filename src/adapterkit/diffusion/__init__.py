"""Diffusion-model adapters (ResAdapter on diffusers UNets)."""
