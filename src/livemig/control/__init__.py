"""The LMO control plane: store, controller (phases), host client, REST API."""
