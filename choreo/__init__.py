"""choreo: Prompt Choreography -- LLM workflows over one global KV cache of messages."""

from . import attention, stats  # noqa: F401  (public submodules)
from .cache import CapacityError, Message
from .baseline import Baseline
from .calls import Call, linearize
from .choreographer import Choreographer
from .runner import Runner, Session
from .model import Model, load_model

__version__ = "0.1.0"
__all__ = ["Baseline", "Call", "CapacityError", "Choreographer", "Message", "Model", "Runner", "Session", "linearize",
           "load_model", "__version__"]
