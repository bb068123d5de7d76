"""LTDiff++: a UNet++ encoder-decoder and a conditional DDPM in its latent space (arXiv 2410.04000).

Modules:
* `unetpp`: the UNet++ autoencoder (nested dense skip pathways, deep supervision heads), Z = E(x).
* `latent_diffusion`: the noise schedule as pure functions and the conditional latent denoiser.
* `sampler`: a small, stateless DDIM sampler (<= 10 steps) driven by explicit generators.
* `weights`: the self-describing safetensors weights format, strict loading.
* `engine`: `LTDiffEngine`, the node's Engine for the "ltdiff" and "unetpp-regression" kinds.

See docs/METHOD.md for the method as built and where it departs from the paper.
"""
