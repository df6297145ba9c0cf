"""The run's plumbing: building a run from its config, the one training loop, the state it
checkpoints, scoring, the files of record, loggers, precision and memory accounting."""
