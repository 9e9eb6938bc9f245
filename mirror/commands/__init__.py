"""One module per subcommand; each has `register(subparsers)` setting `run` to its coroutine."""
