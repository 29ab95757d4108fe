"""The randomized, seeded fault simulation (README "Fault simulation").

- clock.py: one simulated timeline; the reconciler's clock (stepped, skewed) and Airflow's.
- transport.py: the in-process wire from a replica's real AirflowClient to the fake
  Airflow, and the per-request Airflow faults.
- world.py: one seed's world: the fake Airflow on its clock, the replicas (real
  `Reconciler`s behind a store wrapper that can cut or kill them), the leases, the history.
- workload.py: graphs and their changes (synced as commits), root runs, Airflow's
  scheduler (with the eager path's task-level events), users.
- faults.py: the seed's fault schedule and its injector (the real etcd cluster included).
- invariants.py: the checker over Airflow's history.
- runner.py: one seed start to verdict (`run_seed`), and its replay command.

Run by tests/integration/test_simulation.py (fixed seeds) and benchmarks/bench_sim.py (as
many as asked). A third of the seeds run two Airflow deployments (runner.py
`deployments_of`): a fake and a transport each, replicas on an `AirflowFleet`, deployment
faults in faults.py, runs keyed by deployment in invariants.py. To extend (another Airflow
API, more deployments): a new transport or world option, new fault kinds in faults.py,
new checks in invariants.py.
"""
