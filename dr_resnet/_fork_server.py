"""Imported only in the data workers' fork server (dr_resnet.processes): what every worker needs, imported
once there so that each fork starts ready, and the stop signals ignored (the server must outlive them: its
workers end with it)."""

import signal

import torch  # noqa: F401  (preloaded for the workers)

import dr_resnet.data.dataset  # noqa: F401
import dr_resnet.processes

for _signal in dr_resnet.processes.STOP_SIGNALS:
    signal.signal(_signal, signal.SIG_IGN)
