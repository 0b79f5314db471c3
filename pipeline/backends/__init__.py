"""Backends behind pipeline.backend's contract: the LightX2V adapter (with its compat layer) and the
CPU test double. Imported only by the composition root, the bench and tests."""
