"""`run.py serve`: an OpenAI-compatible HTTP server over the engine's continuous batching.

worker.py runs the engine (one thread; every process of a multi-host run), http.py answers
HTTP on process 0 (FastAPI on uvicorn), streams.py turns a request's tokens into OpenAI's
responses and server-sent events, metrics.py keeps the Prometheus metrics, main.py starts it
all and drains it on SIGTERM / Ctrl-C.
"""
