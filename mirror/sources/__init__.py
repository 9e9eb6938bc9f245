"""Where images come from: one small Protocol, one module per kind of endpoint."""
