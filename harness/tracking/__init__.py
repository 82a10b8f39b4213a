"""Tracking: what a study records of its runs, and where.

``Tracker`` and ``TrackedRun`` (protocol) are what the study calls; ``MLflowTracker`` records
in MLflow (one experiment per study, a parent run per study, a child run per trial) and is,
with ``MLflowStore``, the package's only way to MLflow's tracking client; ``InMemoryTracker``
keeps runs in memory for fast tests. server: the tracking URI, its credentials and a server
that stops answering; sqlite_store: the local store's checks, write mode and connections;
mlflow_writer: the process that makes trial runs' writes to the local store; records: the tags
and closing rules every tracker shares. Secret redaction is harness.secrets'."""

from harness.tracking.memory import InMemoryStore, InMemoryTracker
from harness.tracking.mlflow_client import MLflowStore
from harness.tracking.mlflow_run import TrialRun
from harness.tracking.mlflow_tracker import MLflowTracker
from harness.tracking.protocol import (
    ModelDestination,
    ModelLogger,
    TrackedRun,
    Tracker,
    TrackerFactory,
)
from harness.tracking.records import UNRECORDED, config_yaml
from harness.tracking.server import (
    TrackingServerError,
    TrackingUnreachableError,
    check_tracking_server,
    hurry_server_requests,
    is_unreachable,
    tracking_uri,
    unreachable_reason,
    use_server_credentials,
)
from harness.tracking.sqlite_store import check_store_writable, unwritable_store_message

__all__ = [
    "UNRECORDED",
    "InMemoryStore",
    "InMemoryTracker",
    "MLflowStore",
    "MLflowTracker",
    "ModelDestination",
    "ModelLogger",
    "TrackedRun",
    "Tracker",
    "TrackerFactory",
    "TrackingServerError",
    "TrackingUnreachableError",
    "TrialRun",
    "check_store_writable",
    "check_tracking_server",
    "config_yaml",
    "hurry_server_requests",
    "is_unreachable",
    "tracking_uri",
    "unreachable_reason",
    "unwritable_store_message",
    "use_server_credentials",
]
