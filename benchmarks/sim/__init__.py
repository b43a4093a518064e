"""A discrete-event simulator that drives the real Balancer with a virtual clock."""
