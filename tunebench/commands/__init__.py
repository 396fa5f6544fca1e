"""One small module per CLI command: each `*_command(args)` takes the parsed arguments, calls the library and prints.
tunebench/cli.py only parses and calls them."""
