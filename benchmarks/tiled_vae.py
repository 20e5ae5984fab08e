"""The tiled-VAE comparison at any size (``normops demo tiled-vae`` runs it small, with a plot):
a tiny AutoencoderKL decoded whole, on exact tiles (every GroupNorm from all tiles' statistics)
and with diffusers' enable_tiling(); max |error| against the whole decode and peak tensor memory.

    python benchmarks/tiled_vae.py --latent 64 --tile 16
"""
from normops.lessons import tiled_vae

if __name__ == "__main__":
    tiled_vae.main()
