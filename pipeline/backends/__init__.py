"""Backends behind pipeline.backend's contract: the LightX2V adapter (with its compat layer and kernel
choice), the CPU test double and the stand-in for a machine without the GPU stack, with what they share:
the weights layout rule (which install/ and tools/ read too) and the latent previews."""
