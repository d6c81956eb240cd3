"""One module per `medlsam` subcommand; each defines `add_parser(subparsers)`."""
