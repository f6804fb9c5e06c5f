"""``dalle-train serve``: a web page and a JSON endpoint that generate images from one loaded DALLE.

- `requests`: a request's fields parsed once into `GenerationRequest`, bad ones named.
- `batcher`: the bounded queue of jobs and the one worker thread that owns the model and runs
  queued jobs with the same sampling settings together, a generator per image.
- `pngs`: finished images as PNG files that carry their prompt and settings.
- `app`: the FastAPI application (the page, ``/api/jobs``, ``POST /generate``).
- `server`: uvicorn serving the application, in the foreground or in a thread.

Needs the ``serve`` extra: ``pip install "dalle-train[serve]"`` (FastAPI and uvicorn).
"""
