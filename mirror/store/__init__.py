"""The cache on disk: a content-addressed blob store inside an OCI image layout."""
