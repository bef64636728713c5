"""Imported only in the data workers' fork server (dr_resnet.processes): the stop signals blocked (the server
must outlive them: its workers end with it), and what every worker needs, imported once there so that each
fork starts ready."""

import signal

import dr_resnet.processes

# Blocked for good. The server starts so (processes.start_fork_server), so that none can end it before this
# point; blocking again covers a server started otherwise. Each worker it forks inherits the mask, so that
# a signal sent before the worker's initializer has decided (processes.leave_stop_signals_to or
# processes.default_stop_signals) waits for it: neither a data worker killed by the job's SIGTERM nor a
# pool's worker that ignores Pool.terminate's (leaving `with Pool` would then hang).
signal.pthread_sigmask(signal.SIG_BLOCK, dr_resnet.processes.STOP_SIGNALS)

import torch  # noqa: E402, F401  (preloaded for the workers)

import dr_resnet.data.dataset  # noqa: E402, F401
