"""Architecture-specific setup (only x86-64 today)."""
