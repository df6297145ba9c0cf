"""Project infrastructure shared by every package: errors that name what to fix, and files
written atomically and durably (with the fault points the kill tests use)."""
