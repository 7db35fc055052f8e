"""textgen-serve: an OpenAI-compatible server over one model file (serve/app.py, serve/engine.py)."""

# While other streams are open, a stream sends at most one chunk per this many seconds (its first chunk at once):
# each chunk costs the event loop and the client a JSON encode, an HTTP frame and a socket write, and with many
# streams the loop would otherwise write one chunk per token per stream, competing with the scheduler thread for
# the GIL (docs/benchmarks.md, serve section). Light enough to import from the CLI before its heavy imports.
STREAM_INTERVAL_S = 0.02
