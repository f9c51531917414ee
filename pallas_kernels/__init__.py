"""Pallas kernels, each beside its pure-JAX reference and reached through a dispatcher (impl="xla"|"pallas"|"auto").

Depends on JAX alone. The pure-JAX references the kernels are tested against live in nemojax (e.g. the chunked and
sequential SSD in `nemojax.nn.ssd`); the kernels themselves are the subject of the Pallas-kernels issue.
"""
