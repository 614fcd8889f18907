"""Second front doors onto the same capabilities: other services' wire protocols translated to the manager's
operations. Nothing below the manager knows they exist."""
