"""Shared run machinery: device, seeding, precision, compile, checkpoint/resume."""
from fastdistill.engine.checkpoint import load_checkpoint, resume_checkpoint, save_checkpoint
from fastdistill.engine.compile import maybe_compile, should_compile
from fastdistill.engine.device import resolve_device
from fastdistill.engine.precision import Precision
from fastdistill.engine.seeding import seed_everything

__all__ = ["Precision", "load_checkpoint", "maybe_compile", "resolve_device", "resume_checkpoint", "save_checkpoint",
           "seed_everything", "should_compile"]
