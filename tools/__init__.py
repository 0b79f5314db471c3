"""Developer tools: the synthetic checkpoint writer used by tests and the bench."""
