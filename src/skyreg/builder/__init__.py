"""`skyreg builder`: a host that builds Dockerfiles for the server's builds with buildah."""
