"""Kept for the old import path: the lease lives in :mod:`asgi_leasttime.balancer`, beside the
balancer it is one unit with (``from asgi_leasttime.lease import Lease, is_failure`` still works).
"""

from asgi_leasttime.balancer import FAILURE_STATUS, Lease, Outcome, OutcomeListener, is_failure

__all__ = ["FAILURE_STATUS", "Lease", "Outcome", "OutcomeListener", "is_failure"]
