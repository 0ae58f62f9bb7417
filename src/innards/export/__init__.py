"""Exports of innards results in the formats of other tools (Neuronpedia / SAEDashboard feature dashboards)."""
