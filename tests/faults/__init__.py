"""Faults skyreg must survive: a full disk, killed processes, a power cut."""
