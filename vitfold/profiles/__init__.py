"""Latency harness, analytic FLOPs, report writers. No torch: profiles read build directories."""
