"""Thin entry points. Each module here (but main) is one `scalegen` subcommand: it defines
HELP, add_arguments(parser) and run(args) -> int. `main` discovers them."""
