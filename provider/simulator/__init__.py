"""A faithful, in-process imitation of the AI provider (APIMart-style) for tests, demos and benchmarks.

A real aiohttp server on a loopback port, not a mock: ``start_simulator(SimConfig(...))`` returns a
handle with ``base_url``; timings, result shapes, faults and prices are knobs (see ``SimConfig``),
changeable at runtime through ``POST /_sim/config``.
"""

from genline.provider.simulator.faults import SimConfig
from genline.provider.simulator.runner import SimulatorHandle, start_simulator

__all__ = ["SimConfig", "SimulatorHandle", "start_simulator"]
