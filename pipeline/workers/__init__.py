"""Generation on several GPUs: one worker process per GPU, driven from the app's process.

- `protocol`: the typed messages between the app and a worker (requests in, events and replies out).
- `child`: what runs inside a worker process (its own backend and PipelineCache); never imports
  gradio, and imports torch only where the backend needs it.
- `group`: the app's side: a `WorkerGroup` of N processes (N lanes of one GPU each, or one
  sequence-parallel group over N GPUs), and `RemoteBackend`, which makes a group look like any other
  backend to `VideoService`, so the OOM ladder, records and history work unchanged.
"""
