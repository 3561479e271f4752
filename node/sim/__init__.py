"""Fleet simulator: many simulated cars running the node's own policy, placement, routing and
publishing functions (``idlefleet simulate``). Imports no trio and no libp2p."""

from idlefleet.node.sim.engine import SimResult, Simulation, run_simulation
from idlefleet.node.sim.scenario import Scenario, ScenarioError, load_scenario

__all__ = ["Scenario", "ScenarioError", "SimResult", "Simulation", "load_scenario", "run_simulation"]
