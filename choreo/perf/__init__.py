"""Performance: workflow shapes, the arms that run them, and side-by-side measurement.

Modules: ``shapes`` (synthetic content, the paper's workflows), ``arms`` (executors emitting identical
tokens), ``measure`` (``run_once``, ``compare``, speed-ups with their token and pass-cost bounds, the cost
of one forward pass), ``memory`` (peak RSS in a subprocess), ``config`` (profiles), ``report`` (tables,
plots), ``cli`` (``choreo bench``).

Example::

    import choreo
    from choreo import perf
    model = choreo.load_model()
    runs = perf.compare(model, perf.make_shape("tree_of_thoughts", B=8, V=4),
                        arms=("choreographed[torch]", "baseline"), lengths=perf.Lengths(), rounds=3)
    perf.speedups(runs, "baseline", "choreographed[torch]")  # {"e2e": ..., "ttft": ..., bounds ...}
"""

from .arms import (HF_PROTOCOL, TEACHER, HFSession, StepwiseBaseline, StepwiseChoreographer, available_arms,
                   fast_arm, make_executor, model_heads)
from .cli import bench, register, remeasure_memory
from .config import BENCH_PROFILES, BenchConfig, memory_arms
from .measure import (check_identical, compare, family, fit_affine, measure_shape, model_seconds, pass_costs,
                      pass_time, run_once, speedups, summarize, tie_tolerance, time_pass)
from .memory import measure_memory, measure_memory_here, peak_rss, reset_peak_rss, trim_heap
from .report import plot_scaling, rerender, rerender_engine, table_rows, write_pass_costs, write_results
from .shapes import PAPER, PAPER_SHAPES, SCALING, WORKFLOWS, Lengths, Recorder, Shape, Synth, make_shape

__all__ = ["BENCH_PROFILES", "BenchConfig", "HFSession", "HF_PROTOCOL", "Lengths", "PAPER", "PAPER_SHAPES",
           "Recorder", "SCALING", "Shape", "StepwiseBaseline", "StepwiseChoreographer", "Synth", "TEACHER",
           "WORKFLOWS", "available_arms", "bench", "check_identical", "compare", "family", "fast_arm", "fit_affine",
           "make_executor", "make_shape", "measure_memory", "measure_memory_here", "measure_shape", "memory_arms",
           "model_heads", "model_seconds", "pass_costs", "pass_time", "peak_rss", "plot_scaling", "register",
           "remeasure_memory", "rerender", "rerender_engine", "reset_peak_rss", "run_once", "speedups", "summarize",
           "table_rows", "tie_tolerance", "time_pass", "trim_heap", "write_pass_costs", "write_results"]
