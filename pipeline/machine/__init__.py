"""Readings of the machine the jobs run on: GPU memory through NVML and torch's allocator (gpu), host
memory and the host out-of-memory test (hostmem), the Python modules installed (software). Every
reading returns None where it cannot read."""
