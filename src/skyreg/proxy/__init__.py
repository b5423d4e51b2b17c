"""`skyreg proxy`: the HTTP reverse proxy in front of each app's machines."""
