"""Control operations: the admin ops shared by the admin subject and the system server's
`/engine/` routes (`admin_ops`)."""
