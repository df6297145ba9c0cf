"""Tasks as configuration: each task is a file `conf/task/<name>.yaml` (kind, columns, labels,
metrics, source), read by `tasks.registry` into a `tasks.base.Task`, its data read through
`datasets` (`tasks.data`), tokenized and batched (`tasks.batching`), and scored by a head chosen
by its kind (`tasks.heads`, `tasks.aggregators`) with library metrics (`tasks.metrics`)."""
