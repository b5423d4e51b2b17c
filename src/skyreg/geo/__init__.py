"""Regions: where blobs live, pulls across regions, and the replication queue."""
