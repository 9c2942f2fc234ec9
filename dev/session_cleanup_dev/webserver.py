"""Talking to a running dagster-webserver: the one GraphQL path of the dev stack and the tests.

``DagsterGraphQLClient`` does what it covers (launch a run, read its status, terminate runs).
The few queries it lacks (is the code location loaded and are the daemons healthy, list runs,
list backfills) go through the same gql library, on the same endpoint.
"""

from __future__ import annotations

from typing import Any

import gql
from dagster_graphql import DagsterGraphQLClient
from gql.transport.requests import RequestsHTTPTransport

LOCATION = "session_cleanup_dagster"

_READY_QUERY = """{
  workspaceOrError { ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } }
  instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } }
}"""


class LocationLoadError(RuntimeError):
    """The code location failed to load: waiting longer will not help."""


class Webserver:
    """A dagster-webserver at ``http://host:port``."""

    def __init__(self, host: str, port: int, *, timeout_s: int = 30) -> None:
        self.port = port
        self.url = f"http://{host}:{port}"
        self.client = DagsterGraphQLClient(host, port_number=port, timeout=timeout_s)
        self._gql = gql.Client(
            transport=RequestsHTTPTransport(url=f"{self.url}/graphql", timeout=timeout_s)
        )

    def query(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run a GraphQL query the client has no method for; raise on any GraphQL error."""
        return dict(self._gql.execute(gql.gql(query), variable_values=variables or {}))

    def not_ready(self, *, daemons: bool = True) -> str | None:
        """What is still starting, or None once it is all up.

        Up means: our code location is loaded and, with ``daemons``, every required daemon is
        healthy.

        Raises:
            LocationLoadError: the code location loaded with an error.
        """
        data = self.query(_READY_QUERY)
        entries = data["workspaceOrError"].get("locationEntries", [])
        entry = next((e for e in entries if e["name"] == LOCATION), None)
        if entry is None or entry["loadStatus"] != "LOADED":
            return "code location loading"
        loaded = entry["locationOrLoadError"]
        if loaded["__typename"] != "RepositoryLocation":
            raise LocationLoadError(f"code location failed to load: {loaded.get('message')}")
        if not daemons:
            return None
        unhealthy = [
            s["daemonType"]
            for s in data["instance"]["daemonHealth"]["allDaemonStatuses"]
            if s["required"] and not s["healthy"]
        ]
        return f"daemons starting: {', '.join(unhealthy)}" if unhealthy else None
