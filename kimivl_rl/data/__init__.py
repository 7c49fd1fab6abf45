"""Built-in verifiable data (tasks, traces, builder) and the row format for users' data."""
