"""mirror: copy container images from v2/v1 registries and Docker daemons into an OCI cache."""

__version__ = "0.1.0"
