"""Who may do what: access tokens, signed registry tokens (JWT), and the access policy."""
