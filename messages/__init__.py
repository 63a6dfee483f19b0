"""Every typed message between actors and every payload on the wire."""
