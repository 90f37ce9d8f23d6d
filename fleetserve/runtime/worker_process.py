"""A worker process's entry point (runtime/workers.py). It sizes the frameworks' thread pools
before numpy or any framework is imported: they read these variables once, when they load."""

from __future__ import annotations

import os
import pickle
import signal
from multiprocessing.connection import Connection


def main(connection: Connection, settings_pickle: bytes, cores: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides
    # Each framework sizes its pool to every core; N workers doing so oversubscribe the machine
    # N times over (xgboost fell from 1,763 to 126 req/s with 2 workers on 2 cores). A value the
    # server was started with wins.
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, str(cores))
    from fleetserve.runtime.workers import serve

    serve(connection, pickle.loads(settings_pickle))
