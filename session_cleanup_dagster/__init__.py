"""Nightly cleanup of the After Hours app database, as a Dagster code location."""
