"""The execution engine: Ray connection, worker tasks, scheduling, and the merge driver."""
