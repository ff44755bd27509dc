"""The offline path: soft targets already on disk (the `SoftTargetCache` and the export format and
reader); imports nothing of `student_client.online`, so no network code loads to read a shard."""
