"""`snakemake` with the SLURM executor's status polling capped at 2 s: for the tests only.

snakemake-executor-plugin-slurm 2.8.0 waits 10 s longer before each status check that finds no
finished job (up to 180 s); a chain of seven short jobs then spends minutes idle. Capping the
interval changes nothing else: jobs are still submitted with sbatch and tracked with squeue.
"""

import os
import sys

from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor

CAP_S = float(os.environ.get("VLMFLOW_TEST_STATUS_POLL_S", "2"))
_interval = RemoteExecutor.next_seconds_between_status_checks
RemoteExecutor.next_seconds_between_status_checks = _interval.setter(
    lambda self, value: _interval.fset(self, None if value is None else min(value, CAP_S))
)

if __name__ == "__main__":
    from snakemake.cli import main

    sys.exit(main())
