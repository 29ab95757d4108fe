"""The `reconciler` command line (click). Each module registers its commands on `main`."""

import reconciler.cli.etcd_cmds  # noqa: F401  (registers sync, history)
from reconciler.cli import (
    checks_cmds,  # noqa: F401  (registers validate, graph, diff)
    loop_cmds,  # noqa: F401  (registers run, plan)
    operate_cmds,  # noqa: F401  (registers status, suspend, resume, reconcile, rollback,
    #                              wait, doctor)
)
from reconciler.cli.app import main

__all__ = ["main"]
