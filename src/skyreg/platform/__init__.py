"""The management API: orgs, apps, tokens and image listings as JSON under /api/v1."""
