"""One small module per `tunebench` command: each turns parsed arguments into library calls and printed output."""
