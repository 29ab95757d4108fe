"""The service: the loop's roles (observer, leadership, executor, recorder, runner,
puller), `sync`, and observability (logs, metrics, health)."""
