"""`lorakit serve`: an OpenAI-compatible HTTP server, many adapters over one base model, batched together.

    engine.py     continuous batching with per-request adapters and KV caches (one scheduler thread)
    attention.py  ragged attention: each batch row attends over its own cache, batch-independent numerics
    adapters.py   the adapters being served: names, loading from the adapters folder, unloading
    confine.py    reading an adapter folder without ever leaving the adapters folder (no check-then-open race)
    protocol.py   OpenAI request validation, limits, response and stream-chunk shapes
    schema.py     the OpenAPI description of the request and error bodies
    app.py        the FastAPI application
    server.py     running it under uvicorn: stalled connections closed, a bounded wait at shutdown
"""
