"""`paligemma serve`: an OpenAI-compatible HTTP server with continuous batching (docs/SERVING.md).

protocol.py (request/response models, `ApiError`), media.py (image inputs and their limits), translate.py
(chat messages -> prompt, sampling, usage, task results), engine.py (the model's
one thread: continuous batching, per-row KV cache, vision-feature cache), metrics.py (Prometheus text),
app.py (the FastAPI app). The command line is `paligemma/cli/serve.py`.
"""
