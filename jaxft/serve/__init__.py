"""An OpenAI-compatible HTTP server over the generation engine's multi-adapter batches (`python -m jaxft.serve`)."""

from jaxft.serve.app import ApiError, ServeState, create_app
from jaxft.serve.scheduler import Job, Metrics, Scheduler
from jaxft.serve.server import ServeOptions, build, generation_defaults

__all__ = ["ApiError", "Job", "Metrics", "Scheduler", "ServeOptions", "ServeState", "build", "create_app",
           "generation_defaults"]
