"""Pipeline parallelism: stage layout, schedules as data, and the shard_map + scan executor."""
