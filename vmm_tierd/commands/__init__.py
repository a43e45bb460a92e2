"""Small subcommands."""
