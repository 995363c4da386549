"""What ``choreo bench`` and the performance suite measure at each profile."""

from __future__ import annotations

import dataclasses

from ..checks import check_int_fields
from .arms import fast_arm
from .shapes import PAPER_SHAPES, SCALING, Lengths, Shape, make_shape


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Sizes, shapes and repetitions of one profile (``BENCH_PROFILES``).

    Example: ``BENCH_PROFILES["small"].rounds``.
    """

    lengths: Lengths
    shapes: tuple[Shape, ...] = PAPER_SHAPES
    rounds: int = 3
    warmup: int = 1
    scaling: dict = dataclasses.field(default_factory=dict)
    scaling_rounds: int = 1
    memory_arms: tuple[str, ...] = ("choreographed", "baseline")  # "choreographed": the device's default
    # sizes S of the timed passes behind the pass-cost bounds (small ones: choreographed TTFT passes encode a few
    # header tokens); () skips them
    pass_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 128, 512)

    def __post_init__(self):
        check_int_fields(self, ("rounds", "scaling_rounds"))
        check_int_fields(self, ("warmup",), minimum=0)


BENCH_PROFILES = {
    "smoke": BenchConfig(lengths=Lengths(prompt_words=32, content_tokens=4), rounds=3, warmup=1,
                         shapes=(make_shape("multiqa", k=2), make_shape("tree_of_thoughts", B=2, V=2),
                                 make_shape("parallel_debate", A=2, rounds=1)), memory_arms=(), pass_sizes=()),
    "small": BenchConfig(lengths=Lengths(prompt_words=24, content_tokens=8), rounds=2, warmup=1, scaling=SCALING),
    "paper": BenchConfig(lengths=Lengths(prompt_words=64, content_tokens=64), rounds=5, warmup=1, scaling=SCALING,
                         scaling_rounds=3, memory_arms=("choreographed", "baseline", "baseline+prefix", "hf")),
}


def memory_arms(cfg: BenchConfig, device, *, head_dim: int | None = None, dtype=None) -> list[str]:
    """The arms whose peak memory a profile measures, with "choreographed" resolved for ``device`` and a model with
    heads of ``head_dim`` at ``dtype`` (``fast_arm``)."""
    return [fast_arm(device, head_dim=head_dim, dtype=dtype) if a == "choreographed" else a for a in cfg.memory_arms]
