"""Development tools for session-cleanup-dagster: embedded PostgreSQL, demo data, local stack.

Never installed in production (the Docker image installs only the job's package): ``seed``
writes rows, and ``pgserver`` is a whole PostgreSQL build.
"""
