"""Layer 7: integrations with other frameworks (``safepoint.integrations.dask``).

Each integration module imports its framework; import it only where that is installed.
"""
