"""The mesh console: Kiali's graph, Jaeger's timeline and each request's fate, served by the admin listener of one
proxy and, for the whole local mesh, by `meshproxy demo` (`python -m meshproxy.console.mesh`).

Nothing here runs per request: the data path appends to two bounded buffers (telemetry/core.py RECENT_FIELDS,
telemetry/tracing.py SpanBuffer) and these modules read them, with the proxies' own /stats/prometheus text, only
when someone asks.
"""
