"""Resolvent algorithms behind one functional core, :func:`chimera.ops.mix`."""

from chimera.ops.mix import METHODS, mix, mix_sum, resolvent
from chimera.ops.scan import dag_state_solve
from chimera.ops.ssd import ssd_chunked

__all__ = ["METHODS", "dag_state_solve", "mix", "mix_sum", "resolvent", "ssd_chunked"]
