"""The trio edge: ZeroMQ ingest, the journal committer, timers, dispatch, status publishing."""
